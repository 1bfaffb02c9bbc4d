import dataclasses
import warnings

import pytest
import torch

import qlinear_pass as qp
from qlinear_pass import ranking
from qlinear_pass import registry as R
from qlinear_pass import select as SEL
from qlinear_pass.config import backend_names

H100 = R.DeviceInfo("cuda", (9, 0), "fake H100")
A100 = R.DeviceInfo("cuda", (8, 0), "fake A100")
CPU = R.DeviceInfo("cpu", None, "cpu")


def spec(scheme="fp8_rowwise", n=256, k=512, device="cuda", **kw):
    return R.LayerSpec(scheme=scheme, n=n, k=k, act_dtype=torch.bfloat16, out_dtype=torch.bfloat16, device=device,
                       module="layers.0.mlp.up_proj", **kw)


@pytest.fixture
def fake_kernels():
    """Two kernels of a plug-in backend 'testlib' and one of 'testlib2'."""

    class Fast(R.Kernel):
        name, backend, schemes, priority = "testlib_fast", "testlib", ("fp8_rowwise",), 5

        def is_supported(self, device):
            if device.sm is None or device.sm < 90:
                return False, f"needs sm90, this is {device}"
            return True, ""

        def can_implement(self, spec):
            if spec.k % 128:
                return False, f"K={spec.k} is not a multiple of 128"
            return True, ""

    class Slow(R.Kernel):
        name, backend, schemes, priority = "testlib_slow", "testlib", ("fp8_rowwise", "w4a16"), 8

        def is_supported(self, device):
            return (device.type == "cuda", "needs CUDA")

    class Other(R.Kernel):
        name, backend, schemes, priority = "testlib2_any", "testlib2", ("fp8_rowwise",), 1

    for cls in (Fast, Slow, Other):
        qp.register_kernel(cls)
    yield
    for cls in (Fast, Slow, Other):
        R.unregister_kernel(cls.name)


def test_registering_a_kernel_makes_its_backend_known(fake_kernels):
    assert "testlib" in backend_names()
    assert qp.LinearBackendConfig("TestLib").linear_backend == "testlib"


def test_plug_in_kernels_follow_the_table_by_priority(fake_kernels):
    for device in (H100, CPU):
        names = [k.name for k in SEL.candidates("fp8_rowwise", device)]
        plug_ins = [n for n in names if n.startswith("testlib")]
        assert plug_ins == ["testlib2_any", "testlib_fast", "testlib_slow"]
        listed = ranking.row(ranking.device_class(device), "fp8_rowwise", 1).kernels
        assert names[:len(listed)] == list(listed)
    assert SEL.candidates("fp8_rowwise", H100)[-1].name == "emulation"


def test_explicit_backend_filters_and_first_fit_wins(fake_kernels):
    sel = SEL.select(spec(), qp.LinearBackendConfig("testlib"), H100)
    assert sel.kernel.name == "testlib_fast" and sel.rejected == []
    sel = SEL.select(spec(k=200), qp.LinearBackendConfig("testlib"), H100)
    assert sel.kernel.name == "testlib_slow"
    assert sel.rejected == [("testlib_fast", "K=200 is not a multiple of 128")]
    sel = SEL.select(spec(), qp.LinearBackendConfig("testlib"), A100)
    assert sel.kernel.name == "testlib_slow" and "needs sm90" in sel.rejected[0][1]


def test_no_kernel_error_names_layer_candidates_and_fixes(fake_kernels):
    with pytest.raises(qp.NoKernelError) as e:
        SEL.select(spec(k=200), qp.LinearBackendConfig("testlib"), CPU)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    for part in ["'testlib'", "layers.0.mlp.up_proj", "fp8_rowwise", "N=256", "K=200",
                 "testlib_fast: needs sm90", "testlib_slow: needs CUDA", "per_scheme", "on_unsupported='fallback'"]:
        assert part in msg, part


def test_backend_without_kernels_says_so():
    with pytest.raises(qp.NoKernelError, match="has no kernels registered"):
        SEL.select(spec(), qp.LinearBackendConfig("conch"), H100)


def test_auto_never_raises_for_a_known_scheme():
    for scheme in SEL.C.SCHEMES:
        sel = SEL.select(spec(scheme, n=8, k=8, device="meta"), qp.LinearBackendConfig(), R.DeviceInfo("meta"))
        assert sel.kernel is not None


def test_per_scheme_override(fake_kernels):
    cfg = qp.LinearBackendConfig("emulation", per_scheme={"fp8_rowwise": "testlib2"})
    assert SEL.select(spec(), cfg, H100).kernel.name == "testlib2_any"
    assert SEL.select(spec("w4a16", group_size=128), cfg, H100).kernel.name == "emulation"


def test_fallback_warns_once_per_layer_type(fake_kernels):
    cfg = qp.LinearBackendConfig("testlib", on_unsupported="fallback")
    SEL._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s1 = SEL.select(spec(k=200), cfg, CPU)
        s2 = SEL.select(spec(k=200), cfg, CPU)
        s3 = SEL.select(spec(k=200, n=512), cfg, CPU)  # another layer type: warned about too
    assert s1.fallback and s1.kernel is not None and s1.kernel.backend != "testlib"
    assert s2.fallback and s3.fallback
    msgs = [str(x.message) for x in w if "falling back" in str(x.message)]
    assert len(msgs) == 2 and "testlib_fast" in msgs[0] and "N=512" in msgs[1]


def test_register_kernel_rejects_bad_classes():
    with pytest.raises(TypeError):
        qp.register_kernel(object)

    class NoName(R.Kernel):
        backend, schemes = "testlib", ("fp8_rowwise",)

    with pytest.raises(TypeError, match="must set 'name'"):
        qp.register_kernel(NoName)

    class BadScheme(R.Kernel):
        name, backend, schemes = "bad_scheme", "testlib", ("fp9",)

    with pytest.raises(ValueError, match="unknown scheme"):
        qp.register_kernel(BadScheme)


def test_available_backends_table():
    table = qp.available_backends("cpu")
    assert table["emulation"]["w4a16"] == (True, "emulation")
    ok, why = table["conch"]["fp8_rowwise"]
    assert not ok and "no kernels registered" in why
    assert "auto" not in table


def test_device_info_of():
    assert R.DeviceInfo.of("cpu") == R.DeviceInfo("cpu", None, "cpu")
    assert R.DeviceInfo.of(H100) is H100
    assert H100.sm == 90 and "sm90" in str(H100) and H100.present
    if not torch.cuda.is_available():
        absent = R.DeviceInfo.of("cuda")
        assert absent.type == "cuda" and absent.capability is None and not absent.present


@pytest.fixture
def bucket_kernels(monkeypatch):
    """Two CPU kernels for int8_weight_only: one first at M=1, the other above (by the CPU rows)."""
    from qlinear_pass.schemes import reference

    class Decode(R.Kernel):
        name, backend, schemes = "testlib_decode", "testlib", ("int8_weight_only",)

        def run(self, spec, x, params, bias):
            return reference(spec.scheme, x, params, bias, out_dtype=spec.out_dtype)

    class Prefill(R.Kernel):
        name, backend, schemes = "testlib_prefill", "testlib", ("int8_weight_only",)

        def run(self, spec, x, params, bias):
            return reference(spec.scheme, x, params, bias, out_dtype=spec.out_dtype)

    rows = [r for r in ranking.TABLE if (r.device, r.scheme) != ("cpu", "int8_weight_only")]
    rows += [ranking.Row("cpu", "int8_weight_only", (1,), ("testlib_decode", "testlib_prefill"), "test"),
             ranking.Row("cpu", "int8_weight_only", ranking.M_BUCKETS[1:], ("testlib_prefill", "testlib_decode"), "test")]
    monkeypatch.setattr(ranking, "TABLE", tuple(rows))
    for cls in (Decode, Prefill):
        qp.register_kernel(cls)
    yield
    for cls in (Decode, Prefill):
        R.unregister_kernel(cls.name)


def test_auto_plans_per_m_bucket_when_m_is_dynamic(bucket_kernels):
    s = spec("int8_weight_only", device="cpu")
    sel = SEL.select(s, qp.LinearBackendConfig(), CPU)
    assert [(limit, k.name) for limit, k in sel.plan] == [(1, "testlib_decode"), (None, "testlib_prefill")]
    assert sel.kernel_name == "testlib_decode@1;testlib_prefill"
    assert sel.describe() == "testlib_decode (M<=1), testlib_prefill (M>1)"
    assert SEL.parse_plan(sel.kernel_name) == [(1, "testlib_decode"), (None, "testlib_prefill")]
    # a fixed M takes its bucket's winner, no plan
    fixed = SEL.select(dataclasses.replace(s, m=1), qp.LinearBackendConfig(), CPU)
    assert fixed.kernel.name == "testlib_decode" and not fixed.plan
    assert SEL.select(dataclasses.replace(s, m=300), qp.LinearBackendConfig(), CPU).kernel.name == "testlib_prefill"
    # an explicit backend never plans
    assert not SEL.select(s, qp.LinearBackendConfig("testlib"), CPU).plan


def test_the_op_follows_the_plan_by_m(bucket_kernels):
    import torch

    from qlinear_pass.kernels.ops import CALLS
    from .helpers import linear_model, random_activation

    m = linear_model(64, 32, "int8_weight_only")
    f = torch.compile(m, backend=qp.make(inductor=False), dynamic=True)
    with torch.no_grad():
        before = dict(CALLS)
        for rows in (2, 1, 5, 1):
            x = random_activation((rows, 64))
            torch.testing.assert_close(f(x), m(x))
    ran = {k: CALLS[k] - before.get(k, 0) for k in ("testlib_decode", "testlib_prefill")}
    assert ran == {"testlib_decode": 2, "testlib_prefill": 2}


def test_the_op_dispatches_a_plan(bucket_kernels):
    import torch

    from qlinear_pass import schemes as S
    from qlinear_pass.kernels import ops

    p = S.quantize_weight("int8_weight_only", torch.randn(16, 32))
    s = R.LayerSpec("int8_weight_only", 16, 32, torch.float32, torch.float32)
    for rows, ran in ((1, "testlib_decode"), (3, "testlib_prefill"), (1, "testlib_decode")):
        before = ops.CALLS[ran]
        ops.call("testlib_decode@1;testlib_prefill", s, torch.randn(rows, 32), [p["weight"], p["weight_scale"]])
        assert ops.CALLS[ran] == before + 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_available_backends_for_cuda_without_a_cuda_device():
    table = qp.available_backends("cuda")
    for backend, row in table.items():
        for scheme, (ok, why) in row.items():
            assert not ok, (backend, scheme)
            if why not in ("no kernel for this scheme", "no kernels registered"):
                assert "no CUDA device is visible" in why, (backend, scheme, why)


def test_only_kernels_that_read_a_layout_may_take_a_layer_holding_it():
    R._load_backends()
    spec = qp.LayerSpec("w4a16", 64, 128, torch.bfloat16, torch.bfloat16, group_size=128, weight_layout="mma16")
    readers = {k.name for k in R._KERNELS.values() if "w4a16" in k.schemes and SEL.reads_layout(k, spec)[0]}
    assert readers == {"emulation", "cuda_w4a16", "cutlass_w4a16", "triton_weight_only"}
    public = dataclasses.replace(spec, weight_layout="public")
    assert all(SEL.reads_layout(k, public)[0] for k in R._KERNELS.values())
    ok, why = SEL.reads_layout(R.get_kernel("torch_int4pack"), spec)
    assert not ok and why.startswith("reads the weight in the public layout, not the mma16 layout")
    assert "(mma16 layout)" in spec.short() and qp.LayerSpec.from_json(spec.to_json()) == spec
