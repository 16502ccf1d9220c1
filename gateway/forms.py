from datetime import datetime, time, timedelta

from django import forms
from django.utils import timezone

from gateway.models import AccessKey


class AccessKeyCreateForm(forms.Form):
    """Name, scopes and optional expiry date of a new access key."""

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
