import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import qlinear_pass as qp
from qlinear_pass import ranking
from qlinear_pass import registry as R
from qlinear_pass import select as SEL
from qlinear_pass.config import SCHEMES

H100 = R.DeviceInfo("cuda", (9, 0), "fake H100")
A100 = R.DeviceInfo("cuda", (8, 0), "fake A100")
CPU = R.DeviceInfo("cpu", None, "cpu")
CPU_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu" / "bench_cpu.json"


def spec(scheme, device="cpu", n=1024, k=4096, m=None, act_dtype=torch.bfloat16):
    return R.LayerSpec(scheme=scheme, n=n, k=k, act_dtype=act_dtype, out_dtype=act_dtype, device=device,
                       group_size=128 if scheme == "w4a16" else None, weights_constant=True, m=m,
                       act_input="dynamic" if scheme in ("fp8_tensor", "fp8_rowwise", "fp8_block", "int8_rowwise") else "none")


def test_rows_name_registered_kernels_of_their_scheme():
    kernels = R.kernels()
    for row in ranking.TABLE:
        where = f"{row.device}/{row.scheme}/{row.m}"
        assert row.device in ranking.DEVICE_CLASSES, where
        assert row.scheme in SCHEMES, where
        assert row.m and set(row.m) <= set(ranking.M_BUCKETS), where
        assert row.kernels and len(set(row.kernels)) == len(row.kernels), where
        for name in row.kernels:
            assert name in kernels, f"{where}: {name} is not registered"
            assert row.scheme in kernels[name].schemes, f"{where}: {name} does not run {row.scheme}"
        assert row.evidence.strip(), where
        assert row.act_dtypes is None or (row.act_dtypes and all(isinstance(d, torch.dtype) for d in row.act_dtypes)), where


def test_measured_classes_have_one_row_per_scheme_and_bucket():
    for cls in ("sm90", "cuda", "cpu"):
        for scheme in SCHEMES:
            for b in ranking.M_BUCKETS:
                assert ranking.row(cls, scheme, b) is not None, (cls, scheme, b)


def test_two_rows_for_one_bucket_are_an_error(monkeypatch):
    first = ranking.TABLE[0]
    monkeypatch.setattr(ranking, "TABLE", ranking.TABLE + (dataclasses.replace(first, kernels=first.kernels[::-1]),))
    with pytest.raises(ValueError, match=f"two rows .* cover \\({first.device}, {first.scheme}, M bucket {first.m[0]}\\)"):
        ranking.row(first.device, first.scheme, first.m[0])


def test_device_classes():
    assert ranking.device_class(H100) == "sm90"
    assert ranking.device_class(A100) == "cuda"
    assert ranking.device_class(R.DeviceInfo("cuda", None, "absent")) == "cuda"
    assert ranking.device_class(CPU) == "cpu"
    assert ranking.device_class(R.DeviceInfo("meta")) == "other"


@given(m=st.integers(1, 1 << 20))
@example(m=1)
@example(m=2)
@example(m=16)
@example(m=17)
@example(m=1024)
@example(m=1025)
def test_m_bucket_is_the_smallest_bucket_that_holds_m(m):
    b = ranking.m_bucket(m)
    assert b is None or m <= b
    smaller = [x for x in ranking.M_BUCKETS if x is not None and (b is None or x < b)]
    assert all(m > x for x in smaller)


def test_an_unknown_bucket_is_an_error():
    with pytest.raises(ValueError, match="M bucket 7 is not one of"):
        ranking.order([], "w4a16", CPU, 7)


def test_every_order_ends_in_emulation_unless_a_row_puts_it_earlier():
    for device in (H100, A100, CPU, R.DeviceInfo("meta")):
        cls = ranking.device_class(device)
        hidden = set(ranking.BEHIND_EMULATION.get(cls, ()))
        for scheme in SCHEMES:
            for b in ranking.M_BUCKETS:
                names = [k.name for k in SEL.candidates(scheme, device, b)]
                assert sorted(names) == sorted(k.name for k in R.kernels().values() if scheme in k.schemes)
                tail = names[names.index("emulation") + 1:]
                row = ranking.row(cls, scheme, b)
                listed_after = row.kernels[row.kernels.index("emulation") + 1:] if row and "emulation" in row.kernels else ()
                assert set(tail) <= hidden | set(listed_after), (device, scheme, b, tail)


def test_triton_is_never_auto_on_a_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter makes Triton runnable on a CPU
    for scheme in SCHEMES:
        for m in (1, 64, None):
            assert "triton" not in SEL.select(spec(scheme, m=m), qp.LinearBackendConfig(), CPU).kernel_name


def _measured_fastest() -> dict:
    """{(dtype, scheme, M): the kernel with the smallest geometric-mean time over the shapes}."""
    rows = json.loads(CPU_RESULTS.read_text())["rows"]
    times: dict = {}
    for r in rows:
        if r["kind"] == "kernel":
            times.setdefault((r["dtype"], r["scheme"], r["M"]), {}).setdefault(r["name"], []).append(r["time_us"])
    return {key: min(per, key=lambda n: statistics.fmean(math.log(t) for t in per[n])) for key, per in times.items()}


def test_cpu_rows_follow_the_measurements():
    """auto on a CPU picks the kernel benchmarks/results/cpu measured fastest, for every scheme, M and dtype."""
    fastest = _measured_fastest()
    assert {s for _, s, _ in fastest} == set(SCHEMES)
    assert {d for d, _, _ in fastest} == {"bfloat16", "float32"}
    for (dtype, scheme, m), name in fastest.items():
        s = spec(scheme, m=m, act_dtype=getattr(torch, dtype))
        assert SEL.select(s, qp.LinearBackendConfig(), CPU).kernel.name == name, (dtype, scheme, m)


def test_plug_in_kernels_come_after_listed_ones_by_priority():
    made = []
    for name, prio in (("testrank_b", 7), ("testrank_a", 3), ("testrank_c", 7)):
        made.append(type(name, (R.Kernel,), {"name": name, "backend": "testrank", "schemes": ("w4a16",), "priority": prio}))
    for cls in made:
        qp.register_kernel(cls)
    try:
        for device in (H100, CPU):
            names = [k.name for k in SEL.candidates("w4a16", device, 16)]
            listed = ranking.row(ranking.device_class(device), "w4a16", 16).kernels
            assert names[:len(listed)] == list(listed)
            assert [n for n in names if n.startswith("testrank")] == ["testrank_a", "testrank_b", "testrank_c"]
            assert names.index("testrank_c") < names.index("emulation") or "emulation" in listed
    finally:
        for cls in made:
            R.unregister_kernel(cls.name)


def test_a_changed_row_changes_the_selection(monkeypatch):
    s = spec("w4a16", m=1)
    assert SEL.select(s, qp.LinearBackendConfig(), CPU).kernel.name == ranking.row("cpu", "w4a16", 1).kernels[0]
    rows = [r for r in ranking.TABLE if (r.device, r.scheme) != ("cpu", "w4a16")]
    for first in ("emulation", "torch_int4pack"):
        other = "torch_int4pack" if first == "emulation" else "emulation"
        monkeypatch.setattr(ranking, "TABLE", tuple(rows) + (ranking.Row("cpu", "w4a16", ranking.ALL_M, (first, other), "test"),))
        assert SEL.select(s, qp.LinearBackendConfig(), CPU).kernel.name == first
        assert SEL.select(dataclasses.replace(s, m=None), qp.LinearBackendConfig(), CPU).kernel.name == first


def test_sm90_int8_rowwise_takes_the_cuda_kernel_up_to_m16_then_cutlass():
    for b in ranking.M_BUCKETS:
        names = [k.name for k in SEL.candidates("int8_rowwise", H100, b)]
        assert names[:2] == (["cuda_w8a8", "cutlass_int8"] if b in (1, 16) else ["cutlass_int8", "triton_w8a8"])


def test_sm90_decode_buckets_take_our_cuda_kernels_where_they_measured_faster():
    """M <= 16: every scheme's CUDA kernel."""
    cuda = {"fp8_tensor": "cuda_w8a8", "fp8_rowwise": "cuda_w8a8", "int8_rowwise": "cuda_w8a8", "w4a16": "cuda_w4a16",
            "int8_weight_only": "cuda_w8a16", "fp8_weight_only": "cuda_w8a16", "fp8_block": "cuda_w8a8"}
    for scheme in SCHEMES:
        assert SEL.candidates(scheme, H100, 16)[0].name == cuda[scheme], scheme
        assert SEL.candidates(scheme, H100, 1)[0].name == cuda[scheme], scheme


def test_sm90_8bit_weight_only_takes_cutlass_from_m128():
    for scheme, name in (("int8_weight_only", "cutlass_int8_weight_only"), ("fp8_weight_only", "cutlass_fp8_weight_only")):
        for b in (128, 1024, None):
            names = [k.name for k in SEL.candidates(scheme, H100, b)]
            assert names[:2] == [name, "triton_weight_only"] and names.index("cuda_w8a16") > 1


def test_sm90_w4a16_takes_the_cuda_kernel_up_to_m16_then_cutlass():
    for b in ranking.M_BUCKETS:
        names = [k.name for k in SEL.candidates("w4a16", H100, b)]
        if b is not None and b <= 16:
            assert names[:2] == ["cuda_w4a16", "triton_weight_only"]
            assert "cutlass_w4a16" in names  # unlisted there: after the listed ones
        else:
            assert names[:2] == ["cutlass_w4a16", "triton_weight_only"] and "cuda_w4a16" in names


def test_sm90_w4a16_without_cutlass_or_groups_of_32_falls_to_triton(monkeypatch):
    """The plan a Hopper layer gets: the CUTLASS kernel where it can run, else Triton."""
    import qlinear_pass as qp
    from qlinear_pass.kernels import cuda_build, cutlass_build

    monkeypatch.setattr(cuda_build, "toolchain", lambda *a: ("/opt/cuda/bin/nvcc", ""))
    monkeypatch.setattr(cutlass_build, "toolchain_status", lambda: (True, ""))
    for group, second in ((128, "cutlass_w4a16"), (32, "triton_weight_only")):
        s = dataclasses.replace(spec("w4a16", m=None, device="cuda"), group_size=group)
        sel = SEL.select(s, qp.LinearBackendConfig(), H100)
        assert [k.name for _, k in sel.plan][:2] == ["cuda_w4a16", second], (group, sel.plan)


def test_a_layer_holding_the_mma16_layout_follows_its_own_rows():
    """Where CUTLASS cannot run, an MMA-fragment layer takes cuda_w4a16 up to M = 128 (Triton reads
    that layout only through a dequantising pass), then that pass; a public layer keeps its rows."""
    for b in ranking.M_BUCKETS:
        packed = [k.name for k in SEL.candidates("w4a16", H100, b, torch.bfloat16, "mma16")]
        public = [k.name for k in SEL.candidates("w4a16", H100, b, torch.bfloat16, "public")]
        assert public == [k.name for k in SEL.candidates("w4a16", H100, b)]
        if b == 128:
            assert packed[:3] == ["cutlass_w4a16", "cuda_w4a16", "triton_weight_only"]
            assert public[:2] == ["cutlass_w4a16", "triton_weight_only"]
        else:
            assert packed == public
        first = [k.name for k in SEL.candidates("w4a16", A100, b, torch.bfloat16, "mma16")][0]
        assert first == ("cuda_w4a16" if b is not None and b <= 128 else "triton_weight_only"), b
    assert ranking.row("sm90", "w4a16", 128, None, "mma16").weight_layouts == ("mma16",)
    assert ranking.row("sm90", "w4a16", 128, torch.float16, "mma16").weight_layouts == ("mma16",)
    assert ranking.row("sm90", "w4a16", 1024, None, "mma16").weight_layouts is None


def test_an_mma16_layer_without_cutlass_takes_the_decode_kernel_then_the_dequantising_pass(monkeypatch):
    import qlinear_pass as qp
    from qlinear_pass.kernels import cuda_build, cutlass_build

    monkeypatch.setattr(cuda_build, "toolchain", lambda *a: ("/opt/cuda/bin/nvcc", ""))
    monkeypatch.setattr(cutlass_build, "toolchain_status", lambda: (False, "the CUTLASS headers are not installed"))
    s = dataclasses.replace(spec("w4a16", m=None, device="cuda"), weight_layout="mma16")
    sel = SEL.select(s, qp.LinearBackendConfig(), H100)
    assert [(limit, k.name) for limit, k in sel.plan] == [(128, "cuda_w4a16"), (None, "triton_weight_only")]
