import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from qlinear_pass import schemes as S

from .conformance import check_drawn_or_pinned

SCHEMES = [s.name for s in S.all_schemes()]


@pytest.mark.parametrize("scheme", SCHEMES)
@given(data=st.data())
@example(data=None)
def test_emulation_agrees_with_reference(scheme, data):
    check_drawn_or_pinned(scheme, "emulation", data, expect_kernel="emulation")
