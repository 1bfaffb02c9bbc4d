import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qlinear_pass import schemes as S

from .conformance import check_drawn_or_pinned

SCHEMES = [s.name for s in S.all_schemes()]


# the emulation kernel is the scheme's reference itself: what its drawn layers check is the pass's
# plumbing (matcher, spec, op) on shapes, dtypes and biases, which the conformance tests of the
# real kernels (Triton's for every scheme) draw too, so half as many layers as theirs
@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=max(1, settings.default.max_examples // 2))
@given(data=st.data())
@example(data=None)
def test_emulation_agrees_with_reference(scheme, data):
    check_drawn_or_pinned(scheme, "emulation", data, expect_kernel="emulation")
