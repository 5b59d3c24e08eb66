import pytest

from worker.errors import ExportError
from worker.parity import Parity, require


def test_parity_within_tolerance_passes() -> None:
    require(Parity(5e-4, 0.99995, 0.99999), "export", min_cosine=0.9999, max_abs=1e-3)


@pytest.mark.parametrize(
    "parity",
    [Parity(2e-3, 0.99999, 0.99999), Parity(1e-6, 0.9990, 0.9999)],
)
def test_parity_outside_tolerance_refuses_naming_the_figures(parity: Parity) -> None:
    with pytest.raises(ExportError, match=r"export differs too much.*refusing to install it"):
        require(parity, "export", min_cosine=0.9999, max_abs=1e-3)
