"""Credits pages: balance, lots and ledger, buying credits and the Stripe return page."""

import logging

import stripe
from django.http import Http404, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.utils.dateparse import parse_datetime
from django.views import View

from accounts.mixins import AccountRequiredMixin, account_objects
from credits.api import balance_payload
from credits.forms import BuyCreditsForm
from credits.models import CheckoutPurchase, CreditLot, LedgerTransaction
from credits.money import format_usd, format_usd_short
from credits.services import CreditsError, checkout_session_create, checkout_session_fulfil

logger = logging.getLogger(__name__)

RECENT_TRANSACTIONS = 50


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


def transaction_rows(transactions) -> list[dict]:
    return [
        {
            "created_at": entry.created_at,
            "kind": entry.get_kind_display(),
            "description": entry.description,
            "amount": usd_short(entry.amount_nanousd),
            "amount_nanousd": entry.amount_nanousd,
            "balance_after": usd_short(entry.balance_after_nanousd),
        }
        for entry in transactions
    ]


def _credits_page(request, form: BuyCreditsForm, *, status: int = 200):
    transactions = account_objects(LedgerTransaction, request.account).order_by(
        "-created_at", "-id"
    )[:RECENT_TRANSACTIONS]
    context = {
        **balance_context(account=request.account),
        "transactions": transaction_rows(transactions),
        "form": form,
    }
    return render(request, "credits/credits.html", context, status=status)


class CreditsView(AccountRequiredMixin, View):
    def get(self, request):
        return _credits_page(request, BuyCreditsForm())


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
