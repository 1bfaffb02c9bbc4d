"""The helpers kernels behind the op share: the MN-major layout of per-group activation scales."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from qlinear_pass.kernels import ops


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
