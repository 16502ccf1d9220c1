import pytest

from credits.money import (
    ceil_div,
    cents_from_nanousd,
    format_usd,
    format_usd_short,
    nanousd_from_cents,
    parse_usd,
)


def test_cents_convert_to_nanousd_exactly():
    assert nanousd_from_cents(500) == 5_000_000_000
    assert cents_from_nanousd(4_999_999_999) == 499
    assert cents_from_nanousd(-4_999_999_999) == -499


def test_format_usd_has_nine_places():
    assert format_usd(4_999_950_000) == "4.999950000"
    assert format_usd(0) == "0.000000000"
    assert format_usd(-50) == "-0.000000050"


def test_format_usd_short_trims_to_cents():
    assert format_usd_short(5_000_000_000) == "5.00"
    assert format_usd_short(4_999_950_000) == "4.99995"
    assert format_usd_short(-1_500_000_000) == "-1.50"


@pytest.mark.parametrize(
    ("text", "nanousd"),
    [("10.00", 10_000_000_000), ("0.000000001", 1), (" 5 ", 5_000_000_000)],
)
def test_parse_usd_accepts_decimal_strings(text, nanousd):
    assert parse_usd(text) == nanousd


@pytest.mark.parametrize(
    "text", ["abc", "1.0000000001", "NaN", "Infinity", "", "1e5", "1e100000", "0x10", "1_000"]
)
def test_parse_usd_rejects_bad_amounts(text):
    with pytest.raises(ValueError):
        parse_usd(text)


def test_ceil_div_rounds_up():
    assert ceil_div(1, 1_000_000) == 1
    assert ceil_div(1_000_000, 1_000_000) == 1
    assert ceil_div(1_000_001, 1_000_000) == 2
    assert ceil_div(0, 1_000_000) == 0
