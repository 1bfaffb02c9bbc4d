"""The graph-writing helpers of emit.py."""
import torch
import torch.fx as fx
from hypothesis import example, given
from hypothesis import strategies as st

from qlinear_pass.emit import Emitter, mn_major_scale_view
from qlinear_pass.kernels import ops


@given(m=st.integers(1, 41), groups=st.integers(1, 5), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 50))
@example(m=4, groups=1, dtype=torch.float32, seed=0)
@example(m=5, groups=3, dtype=torch.bfloat16, seed=0)
def test_mn_major_scale_view_is_the_same_scales_in_the_gemm_layout(m, groups, dtype, seed):
    """The emitted nodes give the [M, G] scales as a strides-(1, M4) view of a zero-padded float32
    [G, M4] buffer, which ops.mn_major_scales then takes as it is."""
    g = fx.Graph()
    sa = g.placeholder("sa")
    scale = torch.rand(m, groups, generator=torch.Generator().manual_seed(seed)).to(dtype)
    sa.meta["val"] = scale
    out = g.output(None)
    node = mn_major_scale_view(Emitter(g, out, sa), sa, m, groups)
    out.args = (node,)
    got = fx.GraphModule(torch.nn.Module(), g)(scale)
    m4 = -(-m // 4) * 4
    assert got.shape == (m, groups) and got.dtype == torch.float32 and got.stride() == (1, m4)
    assert torch.equal(got, scale.float())
    assert tuple(node.meta["val"].shape) == (m, groups) and node.meta["val"].stride() == (1, m4)
    buf = ops.mn_major_scales(got)
    assert buf.data_ptr() == got.data_ptr()
    assert torch.equal(buf, ops.mn_major_scales(scale))  # the copying path's result, pad zeros included
