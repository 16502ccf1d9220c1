import re
from datetime import datetime, time, timedelta

from django import forms
from django.utils import timezone

from credits.money import parse_usd
from gateway.models import AccessKey, CustomProvider
from gateway.services import REQUESTS_PER_MINUTE_MAX


class AccessKeyCreateForm(forms.Form):
    """Name, scopes, optional expiry date and optional limits of a new access key."""

    # A random token per rendered form: submitting the same form twice (a reload of the
    # result page) creates one key, not two.
    form_token = forms.CharField(widget=forms.HiddenInput, required=False, max_length=64)

    name = forms.CharField(
        max_length=120,
        widget=forms.TextInput(attrs={"placeholder": "e.g. laptop or CI", "autocomplete": "off"}),
    )
    scopes = forms.MultipleChoiceField(
        choices=AccessKey.Scope.choices,
        initial=[AccessKey.Scope.INFERENCE],
        widget=forms.CheckboxSelectMultiple,
        error_messages={"required": "Choose at least one scope."},
        help_text="Inference calls the gateway at /v1; management calls the REST API at /api.",
    )
    expires_on = forms.DateField(
        label="Expires on",
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}, format="%Y-%m-%d"),
        help_text="Optional. The key works until the end of this day in the portal's time zone.",
    )
    spend_limit = forms.CharField(
        label="Spend limit (USD)",
        required=False,
        max_length=32,
        widget=forms.TextInput(attrs={"placeholder": "e.g. 25.00", "inputmode": "decimal"}),
        help_text="Optional. Requests are refused once the key has spent this much.",
    )
    spend_limit_period = forms.ChoiceField(
        label="Spend limit resets",
        required=False,
        choices=AccessKey.SpendLimitPeriod.choices,
        initial=AccessKey.SpendLimitPeriod.MONTHLY,
        help_text="Periods are UTC calendar days, weeks from Monday, or months.",
    )
    requests_per_minute = forms.IntegerField(
        label="Requests per minute",
        required=False,
        min_value=1,
        max_value=REQUESTS_PER_MINUTE_MAX,
        help_text="Optional. Requests beyond this in any 60 seconds get status 429.",
    )

    def clean_spend_limit(self) -> int | None:
        """Return the spend limit in nano-dollars, or None when the field is empty."""
        text = self.cleaned_data["spend_limit"].strip()
        if not text:
            return None
        try:
            nanousd = parse_usd(text)
        except ValueError as error:
            raise forms.ValidationError(str(error), code="invalid") from error
        if nanousd <= 0:
            raise forms.ValidationError("Enter an amount above 0, such as 25.00.", code="min")
        return nanousd

    def clean(self):
        cleaned_data = super().clean()
        if cleaned_data.get("spend_limit") is None or not cleaned_data.get("spend_limit_period"):
            # The period means nothing without a limit; a limit without one never resets.
            cleaned_data["spend_limit_period"] = AccessKey.SpendLimitPeriod.NEVER
        return cleaned_data

    def clean_expires_on(self):
        expires_on = self.cleaned_data["expires_on"]
        if expires_on is not None and expires_on < timezone.localdate():
            raise forms.ValidationError("Choose today or a later date.", code="past")
        return expires_on

    @property
    def expires_at(self) -> datetime | None:
        """Return the moment the key stops working: midnight after the chosen day, or None."""
        expires_on = self.cleaned_data.get("expires_on")
        if expires_on is None:
            return None
        next_day = datetime.combine(expires_on + timedelta(days=1), time.min)
        return timezone.make_aware(next_day)


# Model names in the form are separated by commas or whitespace; names themselves have neither.
MODEL_NAME_SEPARATORS = re.compile(r"[\s,]+")


class ProviderKeyForm(forms.Form):
    """A new own key for a built-in provider; the field never renders a value back."""

    api_key = forms.CharField(
        label="API key",
        max_length=4096,
        widget=forms.PasswordInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
        help_text="Stored encrypted and never shown again; only its last four characters are.",
    )


class CustomProviderForm(forms.Form):
    """Name, base URL, API format, optional key and model names of a custom provider."""

    name = forms.CharField(
        max_length=40,
        widget=forms.TextInput(attrs={"placeholder": "e.g. groq", "autocomplete": "off"}),
        help_text="Lowercase letters, digits, hyphens or underscores. Call its models as "
        "name:model.",
    )
    base_url = forms.CharField(
        label="Base URL",
        max_length=500,
        widget=forms.TextInput(
            attrs={"placeholder": "https://api.example.com/v1", "inputmode": "url"}
        ),
        help_text="OpenAI format: the URL in front of /chat/completions, usually ending in /v1. "
        "Anthropic format: the URL in front of /v1/messages. Its host must resolve to a public "
        "address unless the operator allows private ones.",
    )
    api_format = forms.ChoiceField(label="API format", choices=CustomProvider.ApiFormat.choices)
    api_key = forms.CharField(
        label="API key",
        required=False,
        max_length=4096,
        widget=forms.PasswordInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
        help_text="Optional. Stored encrypted and never shown again.",
    )
    models = forms.CharField(
        label="Models",
        required=False,
        max_length=30_000,
        widget=forms.TextInput(attrs={"placeholder": "llama-3.3-70b, mixtral-8x7b"}),
        help_text="Model names it serves, separated by commas. A name listed by one provider "
        "only can be called without the name: prefix.",
    )

    @property
    def model_names(self) -> list[str]:
        """Return the model names entered, in order."""
        return [name for name in MODEL_NAME_SEPARATORS.split(self.cleaned_data["models"]) if name]


class CustomProviderEditForm(CustomProviderForm):
    """The provider form for a change: a blank key keeps the stored one."""

    key_clear = forms.BooleanField(label="Remove the stored key", required=False)

    field_order = ["name", "base_url", "api_format", "api_key", "key_clear", "models"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields[
            "api_key"
        ].help_text = "Leave blank to keep the stored key; a new key replaces it."

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("api_key") and cleaned.get("key_clear"):
            raise forms.ValidationError(
                "Either enter a new key or remove the stored one, not both.", code="key_conflict"
            )
        return cleaned
