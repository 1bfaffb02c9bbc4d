"""The MMA-fragment int4 layout (kernels/int4_layout.py): a permutation of the public bytes whose
32-bit lane words unpack into the m16n8k16 A fragments, checked against the fragment's definition."""

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from qlinear_pass import schemes as S
from qlinear_pass.kernels import int4_layout as L


@st.composite
def weights(draw):
    n = 16 * draw(st.integers(1, 4))
    k = 16 * draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return q


@given(weights())
@example(torch.arange(256, dtype=torch.int32).reshape(16, 16).remainder(16).to(torch.uint8))
def test_round_trip_and_fragments(q):
    n, k = q.shape
    public = S.pack_int4(q)
    packed = L.to_mma16(public)
    assert packed.shape == (n // 16, k // 16, 128) and packed.dtype == torch.uint8
    assert L.shape_of(packed) == (n, k)
    assert torch.equal(L.from_mma16(packed), public)
    words = np.frombuffer(packed.numpy().tobytes(), dtype="<u4").reshape(n // 16, k // 16, 32)
    qn = q.numpy()
    for n16 in range(n // 16):
        for k16 in range(k // 16):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                w = int(words[n16, k16, lane])
                for i in range(4):  # fragment register i: (v_2i, v_2i+1) = (a_i.x, a_i.y)
                    reg = (w >> (4 * i)) & 0x000F000F
                    row = 16 * n16 + g + 8 * (i % 2)
                    col = 16 * k16 + 2 * t + 8 * (i // 2)
                    assert reg & 0xF == qn[row, col] and reg >> 16 == qn[row, col + 1]


def test_atoms_of_a_row_block_follow_each_other_along_k():
    q = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    packed = L.to_mma16(S.pack_int4(q)).reshape(-1)
    # atom (1, 2) = rows 16..31, k 32..47 starts at byte (1 * 4 + 2) * 128
    one = torch.zeros_like(q)
    one[16:32, 32:48] = q[16:32, 32:48]
    alone = L.to_mma16(S.pack_int4(one)).reshape(-1)
    assert torch.equal(alone[6 * 128:7 * 128], packed[6 * 128:7 * 128])
    assert int(alone[:6 * 128].count_nonzero()) == 0 and int(alone[7 * 128:].count_nonzero()) == 0


def test_refuses_shapes_without_whole_atoms():
    with pytest.raises(ValueError, match="N and K divisible by 16"):
        L.to_mma16(torch.zeros(24, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        L.to_mma16(torch.zeros(16, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"uint8 \[N/16, K/16, 128\]"):
        L.from_mma16(torch.zeros(16, 8, dtype=torch.uint8))
    assert L.check_shape(4096, 14336) == ""


def test_the_copy_is_made_once_remade_when_the_weight_changes_and_dropped_with_it():
    import gc

    q = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    w = S.pack_int4(q)
    before = L.copied_bytes()
    with pytest.warns(UserWarning, match="second copy in the MMA-fragment layout"):  # the memory it costs is said
        first = L.mma16_of(w)
    assert L.mma16_of(w) is first and torch.equal(L.from_mma16(first), w)
    assert L.copied_bytes() == before + w.numel()
    w[0, 0] ^= 0xFF  # an in-place update (a checkpoint loaded into the layer)
    with pytest.warns(UserWarning):
        second = L.mma16_of(w)
    assert second is not first and torch.equal(L.from_mma16(second), w)
    key = id(w)
    assert key in L._copies
    del w, first, second
    gc.collect()
    assert key not in L._copies


def test_layout_names_are_checked():
    L.check_layout("mma16")
    with pytest.raises(ValueError, match=r"weight_layout 'tiles' is not one of \('public', 'mma16'\)"):
        L.check_layout("tiles")
