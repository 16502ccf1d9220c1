"""Cost of one request: the processing fee plus, on built-in inference, the model price."""

from dataclasses import dataclass

from django.conf import settings

from credits.money import TOKENS_PER_MTOK, ceil_div


@dataclass(frozen=True)
class TokenUsage:
    """Tokens of one response. `input_tokens` excludes cached input; output includes reasoning."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return (
            self.input_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
            + self.output_tokens
        )


@dataclass(frozen=True)
class Price:
    """Nano-dollars per million tokens."""

    input: int
    output: int
    cache_read: int
    cache_write: int


@dataclass(frozen=True)
class Cost:
    fee_nanousd: int
    model_cost_nanousd: int

    @property
    def total_nanousd(self) -> int:
        return self.fee_nanousd + self.model_cost_nanousd


def request_cost(*, usage: TokenUsage, price: Price | None) -> Cost:
    """Compute a request's cost exactly and round it up once, to a whole nano-dollar.

    The fee (USD 0.05 per million tokens by default, 50 nano-dollars a token) is an
    integer per token, so all rounding lands on the model cost.
    """
    fee_scaled = usage.total_tokens * settings.GATEWAY_FEE_NANOUSD_PER_MTOK
    model_scaled = 0
    if price is not None:
        model_scaled = (
            usage.input_tokens * price.input
            + usage.output_tokens * price.output
            + usage.cache_read_tokens * price.cache_read
            + usage.cache_write_tokens * price.cache_write
        )
    total = ceil_div(fee_scaled + model_scaled, TOKENS_PER_MTOK)
    fee = ceil_div(fee_scaled, TOKENS_PER_MTOK)
    return Cost(fee_nanousd=fee, model_cost_nanousd=total - fee)
