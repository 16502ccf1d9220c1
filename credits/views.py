"""Credits pages: balance, lots and ledger, buying credits and the Stripe return page."""

import logging

import stripe
from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils.dateparse import parse_datetime
from django.views import View

from accounts.mixins import AccountRequiredMixin, account_objects
from accounts.models import Membership
from credits.api import balance_payload, ledger_rows, ledger_rows_complete
from credits.forms import BuyCreditsForm
from credits.models import CheckoutPurchase, CreditLot, LedgerTransaction
from credits.money import format_usd, format_usd_short
from credits.services import (
    CreditsError,
    account_low_balance_threshold_set,
    checkout_session_create,
    checkout_session_fulfil,
    usd_amount_parse,
)

logger = logging.getLogger(__name__)

RECENT_TRANSACTIONS = 50
# Members see the low-balance alert setting, and only owners and admins change it.
ALERT_SETTING_ROLES = (Membership.Role.OWNER, Membership.Role.ADMIN)


class LowBalanceAlertForm(forms.Form):
    threshold = forms.CharField(
        label="Email me when the balance drops below (USD)",
        required=False,
        max_length=24,
        help_text="Such as 5.00. Owners and admins get one email each time the balance "
        "drops below it. Leave empty to turn the alert off.",
        widget=forms.TextInput(attrs={"inputmode": "decimal", "autocomplete": "off"}),
    )

    def clean_threshold(self) -> int | None:
        """Convert the typed dollars to nano-dollars, or to None (no alert) when empty."""
        text = self.cleaned_data["threshold"].strip()
        if not text:
            return None
        try:
            return usd_amount_parse(text)
        except CreditsError as error:
            raise forms.ValidationError(str(error), code="invalid") from error


def usd_short(nanousd: int) -> str:
    """Format nano-dollars for people with a dollar sign: -1500000000 -> "-$1.50"."""
    text = format_usd_short(nanousd)
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


def usd_exact(nanousd: int) -> str:
    """Format nano-dollars with all nine places and a dollar sign: "$4.999950000"."""
    text = format_usd(nanousd)
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


def balance_context(*, account) -> dict:
    """Collect the balance, debt and unexpired lots of `account` for a template."""
    payload = balance_payload(account=account)
    sources = dict(CreditLot.Source.choices)
    statuses = dict(CreditLot.Status.choices)
    lots = [
        {
            "id": lot["id"],
            "source": sources.get(lot["source"], lot["source"]),
            "status": statuses.get(lot["status"], lot["status"]),
            "spendable": lot["spendable"],
            "original": usd_exact(lot["original_nanousd"]),
            "remaining": usd_exact(lot["remaining_nanousd"]),
            "remaining_nanousd": lot["remaining_nanousd"],
            # The API payload carries ISO 8601 strings, but the date filter needs datetimes.
            "created_at": parse_datetime(lot["created_at"]),
            "expires_at": parse_datetime(lot["expires_at"]),
        }
        for lot in payload["lots"]
    ]
    return {
        "balance": usd_short(payload["balance_nanousd"]),
        "balance_nanousd": payload["balance_nanousd"],
        "debt": usd_short(payload["debt_nanousd"]),
        "debt_nanousd": payload["debt_nanousd"],
        "lots": lots,
    }


def transaction_rows(rows: list[dict]) -> list[dict]:
    """Format rows of the credit history (as the API returns them) for the credits page."""
    kinds = dict(LedgerTransaction.Kind.choices)
    formatted = []
    for row in rows:
        is_usage_day = row["kind"] == LedgerTransaction.Kind.USAGE
        count = row["request_count"]
        formatted.append(
            {
                "created_at": row["created_at"],
                "date": row["date"],
                "is_usage_day": is_usage_day,
                "kind": kinds.get(row["kind"], row["kind"]),
                "description": (
                    f"{count} request{'' if count == 1 else 's'}"
                    if is_usage_day
                    else row["description"]
                ),
                "amount": usd_short(row["amount_nanousd"]),
                "amount_exact": usd_exact(row["amount_nanousd"]),
                "amount_nanousd": row["amount_nanousd"],
                "balance_after": usd_short(row["balance_after_nanousd"]),
            }
        )
    return formatted


def _can_set_alert(request) -> bool:
    return Membership.objects.filter(
        account=request.account, user=request.user, role__in=ALERT_SETTING_ROLES
    ).exists()


def _credits_page(
    request,
    form: BuyCreditsForm,
    *,
    alert_form: LowBalanceAlertForm | None = None,
    status: int = 200,
):
    rows = ledger_rows_complete(ledger_rows(account=request.account)[:RECENT_TRANSACTIONS])
    threshold = request.account.low_balance_threshold_nanousd
    if alert_form is None:
        initial = format_usd_short(threshold) if threshold is not None else ""
        alert_form = LowBalanceAlertForm(initial={"threshold": initial})
    context = {
        **balance_context(account=request.account),
        "transactions": transaction_rows(rows),
        "form": form,
        "alert_form": alert_form,
        "can_set_alert": _can_set_alert(request),
        "alert_threshold": usd_short(threshold) if threshold is not None else None,
    }
    return render(request, "credits/credits.html", context, status=status)


class CreditsView(AccountRequiredMixin, View):
    def get(self, request):
        return _credits_page(request, BuyCreditsForm())

    def post(self, request):
        """Set the low-balance alert threshold. Members get 403 and change nothing."""
        if not _can_set_alert(request):
            raise PermissionDenied("Only owners and admins can change the low-balance alert.")
        alert_form = LowBalanceAlertForm(request.POST)
        if not alert_form.is_valid():
            return _credits_page(request, BuyCreditsForm(), alert_form=alert_form)
        threshold = alert_form.cleaned_data["threshold"]
        try:
            account_low_balance_threshold_set(account=request.account, threshold_nanousd=threshold)
        except CreditsError as error:
            alert_form.add_error("threshold", str(error))
            return _credits_page(request, BuyCreditsForm(), alert_form=alert_form)
        if threshold is None:
            messages.success(request, "The low-balance alert is off.")
        else:
            below = usd_short(threshold)
            messages.success(
                request, f"Owners and admins get an email when the balance drops below {below}."
            )
        response = HttpResponseRedirect(reverse("credits"))
        response.status_code = 303
        return response


class CheckoutView(AccountRequiredMixin, View):
    """Start a Stripe Checkout Session and send the browser to Stripe's payment page."""

    http_method_names = ["post"]

    def post(self, request):
        form = BuyCreditsForm(request.POST)
        if not form.is_valid():
            return _credits_page(request, form)
        try:
            session = checkout_session_create(
                account=request.account, amount_cents=form.amount_cents, user=request.user
            )
        except CreditsError as error:
            logger.info("Rejected checkout for account %s: %s", request.account.pk, error)
            form.add_error("amount", str(error))
            return _credits_page(request, form)
        except stripe.StripeError as error:
            logger.warning(
                "Creating a checkout session for account %s failed: %s",
                request.account.pk,
                type(error).__name__,
            )
            form.add_error(None, "Stripe could not start the payment. Try again in a minute.")
            return _credits_page(request, form, status=502)
        # 303 makes the browser follow with GET, which Stripe's payment page expects.
        response = HttpResponseRedirect(session["url"])
        response.status_code = 303
        return response


class CheckoutSuccessView(AccountRequiredMixin, View):
    """Credit a paid Checkout Session when Stripe sends the buyer back."""

    def get(self, request):
        session_id = request.GET.get("session_id", "").strip()
        if not session_id:
            raise Http404("The session_id query parameter is missing.")
        purchase = get_object_or_404(
            account_objects(CheckoutPurchase, request.account), stripe_session_id=session_id
        )

        context = {"purchase": purchase, "added": None, "error": ""}
        try:
            lot = checkout_session_fulfil(session_id=purchase.stripe_session_id)
        except CreditsError as error:
            logger.warning("Fulfilling checkout purchase %s failed: %s", purchase.pk, error)
            context["error"] = str(error)
        except stripe.StripeError as error:
            # The webhook and the reconcile task still credit the payment later.
            logger.warning(
                "Confirming checkout purchase %s failed: %s", purchase.pk, type(error).__name__
            )
            context["error"] = (
                "Stripe could not confirm the payment yet. Paid credits are added "
                "automatically once Stripe confirms it."
            )
        else:
            if lot is not None:
                context["added"] = usd_short(lot.original_nanousd)
        return render(request, "credits/success.html", context)
