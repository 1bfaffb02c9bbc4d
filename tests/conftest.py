import gc
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=int(os.environ.get("QLINEAR_TEST_EXAMPLES", "8")),
    # each example compiles a model (seconds), far above hypothesis's idea of slow
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("ci")

HAS_CUDA = None  # set by pytest_configure


def pytest_configure(config):
    global HAS_CUDA
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return  # xdist's controller: its workers run the tests; torch would cost it 2-3 s of a core
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
        # the workers share the machine's cores: each its share of threads (OpenMP's pools sized for
        # every core keep the other workers' cores busy); read when torch loads OpenMP, so before it
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

    import torch

    HAS_CUDA = torch.cuda.is_available()
    if not HAS_CUDA:
        # Triton kernels run on the CPU through Triton's interpreter; it is read when
        # triton is first imported, so this comes before anything imports it
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_finish(session):
    """Everything imported so far (torch, transformers, the test modules) lives to the end: frozen,
    the collector no longer walks it at each full collection (Python's own, and the gc.collect()
    calls of the code under test: 0.2 s each without)."""
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config):
    gc.unfreeze()  # collectable again at exit, where bindings (Triton's nanobind) count what was not freed


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _no_guard_latency_profile():
    """Dynamo times each new set of guards once for its compile metrics, after flushing the CPU
    caches: 35 ms of a one-linear compile's 250 (the tests compile some 450 times), and the flush
    evicts the other worker's data too. No test reads that metric."""
    import torch._dynamo.guards as guards

    if hasattr(guards, "profile_guard_manager"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(guards, "profile_guard_manager", lambda *args: 0.0)
            yield
    else:
        yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """A clean Dynamo, and no on-disk caches: a cache hit skips the pass, and with it
    the decisions the tests read (the cache key includes the config, so users keep them)."""
    import torch
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


@pytest.fixture
def fresh_warnings():
    """Forget which grad-needing graphs were already warned about (warned once per process)."""
    from qlinear_pass import compile as qcompile

    saved = set(qcompile._WARNED)
    qcompile._WARNED.clear()
    yield
    qcompile._WARNED.clear()
    qcompile._WARNED.update(saved)
