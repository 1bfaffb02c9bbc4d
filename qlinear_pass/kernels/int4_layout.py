"""The MMA-fragment layout of packed int4 weights, shared by the w4a16 kernels that read it.

The public layout is ``[N, K/2]`` bytes, low nibble = even k.  The MMA-fragment layout keeps the
same bytes in another order, so that a GPU lane loads the 16x16 A-fragment of a tensor-core MMA
(``mma.sync.m16n8k16`` and the register-sourced ``wgmma``, which hand A out alike) as one 32-bit
word:

* the weight is cut into atoms of 16 rows x 16 k (128 bytes); atom ``(n16, k16)`` starts at byte
  ``(n16 * K/16 + k16) * 128``: the atoms of a 16-row block follow each other along K, so a
  block's chunk of K is one contiguous run;
* in an atom, lane ``L = 4 g + t`` (g = 0..7, t = 0..3) owns word ``L`` (bytes 4L..4L+3), which
  holds the lane's eight fragment values v0..v7:
  ``v = e + 2 hi + 4 kh`` is the value at row ``g + 8 hi``, k ``2 t + e + 8 kh``;
* in the word, nibble ``p`` (bits 4p..4p+3) holds value ``v = 2 (p % 4) + p // 4``: the order
  [v0 v2 v4 v6 v1 v3 v5 v7], so ``(word >> 4 i) & 0x000F000F`` is the pair (v_2i, v_2i+1) in
  the two 16-bit halves: fragment register i, one LOP3 (and a shift) from a 16-bit float.

As a CuTe layout in int4 elements (``qlp_gemm.cuh``'s ``Mma16Layout``), row ``(g, hi)`` has
strides ``(32, 1)`` and k ``(e, t, kh)`` strides ``(4, 8, 2)`` inside an atom; atoms are ``256``
apart along K and ``256 * K/16`` along N.
"""
from __future__ import annotations

import warnings
import weakref

import torch

#: rows and k of an atom; bytes of an atom
ATOM = 16
ATOM_BYTES = ATOM * ATOM // 2

#: how a w4a16 layer may hold its weight (``QuantizedLinear.weight_layout``, ``LayerSpec.weight_layout``):
#: the public ``[N, K/2]`` bytes, or this module's MMA-fragment layout ``[N/16, K/16, 128]``
PUBLIC = "public"
MMA16 = "mma16"
LAYOUTS = (PUBLIC, MMA16)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"weight_layout {layout!r} is not one of {LAYOUTS}")


def check_shape(n: int, k: int) -> str:
    """Why an [N, K] weight has no MMA-fragment layout ("" when it has)."""
    if n % ATOM or k % ATOM:
        return f"the MMA-fragment int4 layout needs N and K divisible by {ATOM} (N={n}, K={k})"
    return ""


def _atom_order(device) -> torch.Tensor:
    """[256]: for each nibble of an atom (4-bit word position, in byte order), the atom-local
    index ``row * 16 + k`` of the value it holds."""
    p = torch.arange(256, device=device)
    lane, pos = p // 8, p % 8
    g, t = lane // 4, lane % 4
    v = 2 * (pos % 4) + pos // 4
    e, hi, kh = v % 2, (v // 2) % 2, v // 4
    return (g + 8 * hi) * ATOM + (2 * t + e + 8 * kh)


def to_mma16(w: torch.Tensor) -> torch.Tensor:
    """Public ``[N, K/2]`` uint8 -> the same bytes in the MMA-fragment layout, shaped ``[N/16, K/16,
    128]`` (16-row blocks, their atoms along K, an atom's bytes): a shape no public weight has, so
    the two layouts cannot be taken for each other."""
    n, half = w.shape
    k = 2 * half
    why = check_shape(n, k)
    if why:
        raise ValueError(why)
    if w.dtype != torch.uint8:
        raise ValueError(f"packed int4 weights are uint8, not {w.dtype}")
    q = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(n, k)  # values, [N, K]
    atoms = q.reshape(n // ATOM, ATOM, k // ATOM, ATOM).permute(0, 2, 1, 3).reshape(n // ATOM, k // ATOM, ATOM * ATOM)
    nib = atoms[..., _atom_order(w.device)]  # nibbles in byte order
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).contiguous()


def shape_of(packed: torch.Tensor) -> tuple[int, int]:
    """(N, K) of a weight in the MMA-fragment layout ([N/16, K/16, 128] uint8)."""
    if packed.dim() != 3 or packed.shape[2] != ATOM_BYTES or packed.dtype != torch.uint8:
        raise ValueError(f"an int4 weight in the MMA-fragment layout is uint8 [N/16, K/16, {ATOM_BYTES}], got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    return ATOM * packed.shape[0], ATOM * packed.shape[1]


def from_mma16(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_mma16`: the public ``[N, K/2]`` layout."""
    n, k = shape_of(packed)
    b = packed
    nib = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(n // ATOM, k // ATOM, ATOM * ATOM)
    atoms = torch.empty_like(nib)
    atoms[..., _atom_order(packed.device)] = nib
    q = atoms.reshape(n // ATOM, k // ATOM, ATOM, ATOM).permute(0, 2, 1, 3).reshape(n, k)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


#: id(public weight) -> (weakref to it, its version, its MMA-fragment copy): the one copy every
#: kernel that reads the layout shares, made on a layer's first call, dropped with its weight
_copies: dict = {}

TWO_COPIES = ("qlinear_pass: w4a16 weights held in the public [N, K/2] layout get a second copy in the MMA-fragment "
              "layout that cuda_w4a16 and cutlass_w4a16 read, as large as the first; quantize(..., weight_layout='mma16') "
              "(or QuantizedLinear.repack('mma16')) makes the layers hold that layout alone")


def mma16_of(weight: torch.Tensor) -> torch.Tensor:
    """The MMA-fragment copy of a public ``[N, K/2]`` weight, made once and kept while the weight lives
    unchanged (not kept when first asked for inside a CUDA graph capture, whose pool must not
    outlive the graph)."""
    packed = _kept(weight)
    if packed is not None:
        return packed
    packed = to_mma16(weight)
    warnings.warn(TWO_COPIES, UserWarning, stacklevel=2)
    if not (weight.is_cuda and torch.cuda.is_current_stream_capturing()):
        key = id(weight)
        if key not in _copies:
            weakref.finalize(weight, _copies.pop, key, None)
        _copies[key] = (weakref.ref(weight), weight._version, packed)
    return packed


def _kept(weight: torch.Tensor):
    """The MMA-fragment copy kept for this weight as it is now, or None."""
    hit = _copies.get(id(weight))
    return hit[2] if hit is not None and hit[0]() is weight and hit[1] == weight._version else None


def has_mma16(weight: torch.Tensor) -> bool:
    """Whether :func:`mma16_of` has the weight's MMA-fragment copy already (made in an earlier call, not
    by a kernel just ahead of the next launch)."""
    return _kept(weight) is not None


def copied_bytes() -> int:
    """Bytes of the MMA-fragment copies alive now (what the layers hold beside their public weights)."""
    return sum(packed.numel() for ref, _, packed in list(_copies.values()) if ref() is not None)
