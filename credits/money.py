"""Conversions between nano-dollars (the internal unit), Stripe cents and display strings.

Every amount of money inside Tollbooth is an integer number of nano-dollars (1e-9 USD).
This module is the one place that converts to and from other units.
"""

import re
from decimal import Decimal

NANOUSD_PER_USD = 1_000_000_000
NANOUSD_PER_CENT = 10_000_000
TOKENS_PER_MTOK = 1_000_000


def nanousd_from_cents(cents: int) -> int:
    return cents * NANOUSD_PER_CENT


def cents_from_nanousd(nanousd: int) -> int:
    """Return whole cents, rounded toward zero (a balance never shows more than it has)."""
    if nanousd < 0:
        return -((-nanousd) // NANOUSD_PER_CENT)
    return nanousd // NANOUSD_PER_CENT


def format_usd(nanousd: int) -> str:
    """Format nano-dollars as a USD string with nine places: 4999950000 is "4.999950000"."""
    sign = "-" if nanousd < 0 else ""
    whole, fraction = divmod(abs(nanousd), NANOUSD_PER_USD)
    return f"{sign}{whole}.{fraction:09d}"


def format_usd_short(nanousd: int) -> str:
    """Format for people: two places when exact to the cent, else up to nine places."""
    text = format_usd(nanousd)
    whole, fraction = text.split(".")
    fraction = fraction.rstrip("0")
    if len(fraction) < 2:
        fraction = fraction.ljust(2, "0")
    return f"{whole}.{fraction}"


# Plain decimal notation only: Decimal would also take "1e100000", slowly.
USD_TEXT = re.compile(r"-?\d{1,15}(\.\d+)?")


def parse_usd(text: str) -> int:
    """Parse a USD amount such as "10.00" into nano-dollars.

    Raises ValueError when the text is not a plain decimal number or has more than nine
    decimal places.
    """
    cleaned = text.strip() if isinstance(text, str) else ""
    if not USD_TEXT.fullmatch(cleaned):
        raise ValueError(f"{text!r} is not a USD amount such as 10.00.")
    nanousd = Decimal(cleaned) * NANOUSD_PER_USD
    if nanousd != nanousd.to_integral_value():
        raise ValueError(f"{text!r} has more than nine decimal places.")
    return int(nanousd)


def ceil_div(numerator: int, denominator: int) -> int:
    """Divide positive integers, rounding up: money is charged in whole nano-dollars."""
    return -((-numerator) // denominator)
