"""The helpers kernels behind the op share (the MN-major layout of per-group activation scales), and
qlinear_pass::int4_from_mma16, which reads an MMA-fragment int4 weight back as its public bytes."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from qlinear_pass import schemes as S
from qlinear_pass.kernels import int4_layout, ops

from .test_int4_layout import weights


@given(m=st.integers(1, 41), groups=st.integers(1, 5), seed=st.integers(0, 100),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_mn_major_scales_memory(m, groups, seed, dtype):
    """[M, G] -> contiguous float32 [G, M rounded up to 4]: value (m, g) at g * M4 + m, the pad zero."""
    scale = torch.rand(m, groups, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out = ops.mn_major_scales(scale)
    m4 = -(-m // 4) * 4
    assert out.shape == (groups, m4) and out.dtype == torch.float32 and out.is_contiguous()
    flat = out.reshape(-1)
    for g in range(groups):
        assert torch.equal(flat[g * m4:g * m4 + m], scale[:, g].float())
        assert torch.count_nonzero(flat[g * m4 + m:(g + 1) * m4]) == 0


@given(m=st.integers(1, 41), groups=st.integers(1, 5), seed=st.integers(0, 100))
def test_mn_major_scales_takes_an_mn_major_view_without_a_copy(m, groups, seed):
    """The [M, G] view of a float32 [G, M4] buffer (strides (1, M4)) comes back as that buffer."""
    m4 = -(-m // 4) * 4
    buf = torch.zeros(groups, m4)
    buf[:, :m] = torch.rand(groups, m, generator=torch.Generator().manual_seed(seed))
    view = buf[:, :m].t()
    out = ops.mn_major_scales(view)
    assert out.data_ptr() == buf.data_ptr() and out.shape == (groups, m4) and out.is_contiguous()
    assert torch.equal(out, buf)
    # the same values in any other memory are copied into the layout
    copied = ops.mn_major_scales(view.clone(memory_format=torch.contiguous_format))
    assert copied.data_ptr() != buf.data_ptr() and torch.equal(copied, buf)


def test_the_op_resolves_its_strings_once(monkeypatch):
    """The hot path: the kernel name and spec JSON become a handle on the first call only."""
    import torch

    from qlinear_pass import schemes as S
    from qlinear_pass.spec import LayerSpec

    calls = []
    real = LayerSpec.from_json

    def counting(text):
        calls.append(text)
        return real(text)

    monkeypatch.setattr(LayerSpec, "from_json", staticmethod(counting))
    p = S.quantize_weight("int8_weight_only", torch.randn(16, 32))
    spec = LayerSpec("int8_weight_only", 16, 32, torch.float32, torch.float32, module="resolve.once")
    for rows in (1, 3, 2):
        ops.call("emulation", spec, torch.randn(rows, 32), [p["weight"], p["weight_scale"]])
    assert len(calls) == 1


@given(weights())
def test_the_op_reads_the_public_bytes_back(q):
    public = S.pack_int4(q)
    packed = int4_layout.to_mma16(public)
    assert torch.equal(torch.ops.qlinear_pass.int4_from_mma16(packed), public)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.qlinear_pass.int4_from_mma16(mode.from_tensor(packed))
    assert fake.shape == public.shape and fake.dtype == torch.uint8
