import pytest
from hypothesis import given

from qlinear_pass import schemes as S

from .conformance import check_against_reference, layer_cases

SCHEMES = [s.name for s in S.all_schemes()]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_emulation_agrees_with_reference(scheme):
    @given(case=layer_cases(scheme))
    def run(case):
        check_against_reference(scheme, "emulation", case, expect_kernel="emulation")

    run()
