import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run on the CPU through Triton's interpreter; it is read when
    # triton is first imported, so this comes before anything imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
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


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """A clean Dynamo, and no on-disk caches: a cache hit skips the pass, and with it
    the decisions the tests read (the cache key includes the config, so users keep them)."""
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
