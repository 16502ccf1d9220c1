from decimal import Decimal, InvalidOperation

from django import forms
from django.conf import settings


def _usd_from_cents(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


class BuyCreditsForm(forms.Form):
    """An amount of credits to buy, typed in dollars such as "10.00"."""

    amount = forms.CharField(
        label="Amount (USD)",
        max_length=16,
        initial="10.00",
        widget=forms.TextInput(attrs={"inputmode": "decimal", "autocomplete": "off"}),
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["amount"].help_text = (
            f"At least {_usd_from_cents(settings.CREDITS_MIN_PURCHASE_CENTS)}, "
            "in dollars and cents, such as 10.00."
        )

    def clean_amount(self) -> int:
        """Convert the typed dollars to an integer number of cents."""
        text = self.cleaned_data["amount"].strip().removeprefix("$").strip()
        try:
            dollars = Decimal(text)
        except InvalidOperation as error:
            raise forms.ValidationError(
                "Enter an amount in dollars, such as 10.00.", code="invalid"
            ) from error
        if not dollars.is_finite():
            raise forms.ValidationError(
                "Enter an amount in dollars, such as 10.00.", code="invalid"
            )

        # Compare before scaling, so that an input such as "1e999999" cannot overflow.
        minimum = settings.CREDITS_MIN_PURCHASE_CENTS
        maximum = settings.CREDITS_MAX_PURCHASE_CENTS
        if dollars < Decimal(minimum) / 100:
            raise forms.ValidationError(
                f"The minimum purchase is {_usd_from_cents(minimum)}.", code="min_value"
            )
        if dollars > Decimal(maximum) / 100:
            raise forms.ValidationError(
                f"The maximum purchase is {_usd_from_cents(maximum)}.", code="max_value"
            )

        cents = dollars * 100
        # "5.001" would be a fraction of a cent, which Stripe cannot charge.
        if cents != cents.to_integral_value():
            raise forms.ValidationError(
                "Enter at most two decimal places, such as 10.00.", code="precision"
            )
        return int(cents)

    @property
    def amount_cents(self) -> int:
        """Return the validated amount in cents. Call it only after `is_valid()` returned True."""
        return self.cleaned_data["amount"]
