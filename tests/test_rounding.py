"""A request's cost is its exact cost rounded up once, to a whole nano-dollar.

The exact cost is computed with Fraction: tokens times nano-dollars per million tokens,
divided by a million.
"""

import math
from fractions import Fraction

import pytest
from django.test import override_settings
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pricing import Price, TokenUsage, request_cost

TOKENS_PER_MTOK = 1_000_000
DEFAULT_FEE_PER_TOKEN = 50

token_counts = st.integers(min_value=0, max_value=50_000_000)
# Nano-dollars per million tokens, from free to USD 1,000 per million tokens. Values
# that are not multiples of a million make fractional nano-dollars per token.
per_mtok = st.integers(min_value=0, max_value=1_000_000_000_000)
usages = st.builds(
    TokenUsage,
    input_tokens=token_counts,
    output_tokens=token_counts,
    cache_read_tokens=token_counts,
    cache_write_tokens=token_counts,
    reasoning_tokens=token_counts,
)
prices = st.one_of(
    st.none(),
    st.builds(Price, input=per_mtok, output=per_mtok, cache_read=per_mtok, cache_write=per_mtok),
)


def exact_model_cost(usage: TokenUsage, price: Price | None) -> Fraction:
    if price is None:
        return Fraction(0)
    return Fraction(
        usage.input_tokens * price.input
        + usage.output_tokens * price.output
        + usage.cache_read_tokens * price.cache_read
        + usage.cache_write_tokens * price.cache_write,
        TOKENS_PER_MTOK,
    )


def billed_tokens(usage: TokenUsage) -> int:
    # Output tokens already include reasoning tokens, which are not billed twice.
    return (
        usage.input_tokens
        + usage.output_tokens
        + usage.cache_read_tokens
        + usage.cache_write_tokens
    )


@settings(max_examples=300, deadline=None)
@given(usage=usages, price=prices)
def test_default_fee_cost_rounds_up_once(usage, price):
    exact_fee = Fraction(billed_tokens(usage) * DEFAULT_FEE_PER_TOKEN)
    exact = exact_fee + exact_model_cost(usage, price)

    cost = request_cost(usage=usage, price=price)

    assert cost.total_nanousd == math.ceil(exact)
    assert 0 <= cost.total_nanousd - exact < 1
    assert cost.fee_nanousd == DEFAULT_FEE_PER_TOKEN * billed_tokens(usage)
    assert cost.model_cost_nanousd == math.ceil(exact_model_cost(usage, price))


@settings(max_examples=300, deadline=None)
@given(usage=usages, price=prices, fee_per_mtok=per_mtok)
def test_any_fee_cost_never_below_exact(usage, price, fee_per_mtok):
    exact_fee = Fraction(billed_tokens(usage) * fee_per_mtok, TOKENS_PER_MTOK)
    exact = exact_fee + exact_model_cost(usage, price)

    with override_settings(GATEWAY_FEE_NANOUSD_PER_MTOK=fee_per_mtok):
        cost = request_cost(usage=usage, price=price)

    assert cost.total_nanousd == math.ceil(exact)
    assert 0 <= cost.total_nanousd - exact < 1
    assert cost.fee_nanousd == math.ceil(exact_fee)
    assert cost.model_cost_nanousd == cost.total_nanousd - cost.fee_nanousd
    assert cost.model_cost_nanousd >= 0


@given(usage=usages, price=prices, reasoning=token_counts)
def test_reasoning_tokens_not_charged_twice(usage, price, reasoning):
    with_reasoning = TokenUsage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        reasoning_tokens=reasoning,
    )

    assert request_cost(usage=with_reasoning, price=price) == request_cost(
        usage=usage, price=price
    )


@pytest.mark.parametrize("tokens", [0, 1, 7, 999_999, 1_000_000, 123_456_789])
def test_default_fee_is_50_nanousd_per_token(tokens):
    usage = TokenUsage(input_tokens=tokens // 2, output_tokens=tokens - tokens // 2)

    cost = request_cost(usage=usage, price=None)

    assert (cost.fee_nanousd, cost.model_cost_nanousd, cost.total_nanousd) == (
        50 * tokens,
        0,
        50 * tokens,
    )


def test_token_fractions_summed_before_rounding():
    # Half a nano-dollar for the input token and half for the output token: exactly one
    # nano-dollar, where rounding each part up would charge two.
    usage = TokenUsage(input_tokens=1, output_tokens=1)
    price = Price(input=500_000, output=500_000, cache_read=0, cache_write=0)

    cost = request_cost(usage=usage, price=price)

    assert (cost.fee_nanousd, cost.model_cost_nanousd, cost.total_nanousd) == (100, 1, 101)


def test_sub_nanousd_cost_rounds_up_to_one():
    usage = TokenUsage(input_tokens=1)
    price = Price(input=1, output=0, cache_read=0, cache_write=0)

    cost = request_cost(usage=usage, price=price)

    assert (cost.fee_nanousd, cost.model_cost_nanousd, cost.total_nanousd) == (50, 1, 51)


@override_settings(GATEWAY_FEE_NANOUSD_PER_MTOK=1)
def test_fee_and_model_fractions_round_once():
    # Fee 0.000001 and model cost 0.000002 nano-dollars: one nano-dollar in all, billed
    # as fee because the fee is rounded up first and the rest lands on the model cost.
    usage = TokenUsage(input_tokens=1)
    price = Price(input=2, output=0, cache_read=0, cache_write=0)

    cost = request_cost(usage=usage, price=price)

    assert (cost.fee_nanousd, cost.model_cost_nanousd, cost.total_nanousd) == (1, 0, 1)
