from decimal import Decimal

import pytest

from kernel.money import nusd_to_usd, usd_to_nusd


def test_usd_to_nusd_is_exact() -> None:
    assert usd_to_nusd("10") == 10_000_000_000
    assert usd_to_nusd("0.015") == 15_000_000
    assert usd_to_nusd("$12.50") == 12_500_000_000
    assert usd_to_nusd(Decimal("0.000000001")) == 1
    assert usd_to_nusd(3) == 3_000_000_000


@pytest.mark.parametrize("bad", ["0.0000000001", "-1", "abc", "NaN"])
def test_usd_to_nusd_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        usd_to_nusd(bad)


def test_usd_to_nusd_refuses_floats() -> None:
    with pytest.raises(TypeError):
        usd_to_nusd(0.1)  # type: ignore[arg-type]


def test_nusd_to_usd() -> None:
    assert nusd_to_usd(10_500_000_000) == "10.5"
    assert nusd_to_usd(1) == "0.000000001"
    assert nusd_to_usd(0) == "0"
    assert nusd_to_usd(-2_000_000_000) == "-2"
