from datetime import UTC

from django.db.models import (
    BigIntegerField,
    CharField,
    Count,
    F,
    IntegerField,
    Max,
    OuterRef,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Cast, TruncDate
from django.utils import timezone
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework import generics, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import Account
from credits.models import CreditLot, LedgerTransaction
from credits.money import cents_from_nanousd, format_usd
from credits.services import (
    CreditsError,
    account_balance,
    account_low_balance_threshold_set,
    checkout_session_create,
    usd_amount_parse,
)
from gateway.authentication import request_account


class StrictIntegerField(serializers.Field):
    """An integer that must be a JSON number without a fraction, not a string or a bool."""

    default_error_messages = {
        "invalid": "must be an integer number of cents, such as 500 for USD 5.00.",
    }

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return data

    def to_representation(self, value):
        return value


class CheckoutSessionRequestSerializer(serializers.Serializer):
    amount = StrictIntegerField(help_text="Amount in US cents, at least 500 (USD 5.00).")


class CheckoutSessionSerializer(serializers.Serializer):
    id = serializers.CharField()
    url = serializers.URLField()
    amount = serializers.IntegerField(help_text="Amount in US cents.")


class LotSerializer(serializers.ModelSerializer):
    original_usd = serializers.SerializerMethodField()
    remaining_usd = serializers.SerializerMethodField()
    spendable = serializers.SerializerMethodField()

    class Meta:
        model = CreditLot
        fields = [
            "id",
            "source",
            "status",
            "original_usd",
            "remaining_usd",
            "original_nanousd",
            "remaining_nanousd",
            "created_at",
            "expires_at",
            "expired_at",
            "spendable",
        ]
        extra_kwargs = {
            "expired_at": {
                "help_text": "When the expiry was written to the ledger, taking the remainder; "
                "null before that. The lot stops being spendable at `expires_at` already."
            }
        }

    def get_original_usd(self, lot: CreditLot) -> str:
        return format_usd(lot.original_nanousd)

    def get_remaining_usd(self, lot: CreditLot) -> str:
        return format_usd(lot.remaining_nanousd)

    def get_spendable(self, lot: CreditLot) -> bool:
        return lot.is_spendable(at=self.context["now"])


class BalanceSerializer(serializers.Serializer):
    balance_usd = serializers.CharField()
    balance_nanousd = serializers.IntegerField()
    balance_cents = serializers.IntegerField()
    debt_usd = serializers.CharField()
    debt_nanousd = serializers.IntegerField()
    low_balance_threshold_usd = serializers.CharField(
        allow_null=True,
        help_text="Owners and admins get an email when the balance drops below this; "
        "null when the alert is off.",
    )
    low_balance_threshold_nanousd = serializers.IntegerField(allow_null=True)
    lots = LotSerializer(many=True)


class BalanceSettingsSerializer(serializers.Serializer):
    low_balance_threshold_usd = serializers.CharField(
        allow_null=True,
        max_length=32,
        help_text='USD as a decimal string, such as "5.00", from 0 to 1000000; null turns '
        "the alert off. One email goes out each time the balance drops below it, and at "
        "once when the balance is already below the new threshold.",
    )

    def validate_low_balance_threshold_usd(self, value: str | None) -> int | None:
        if value is None:
            return None
        try:
            return usd_amount_parse(value)
        except CreditsError as error:
            raise serializers.ValidationError(str(error)) from error


class TransactionSerializer(serializers.Serializer):
    """One row of the credit history: a transaction, or a UTC day of usage summed up."""

    id = serializers.IntegerField(
        allow_null=True, help_text="The transaction's id, or null on a day of usage."
    )
    kind = serializers.ChoiceField(choices=LedgerTransaction.Kind.choices)
    date = serializers.DateField(help_text="The UTC day.")
    created_at = serializers.DateTimeField(
        help_text="When it happened. On a day of usage, the time of its last charge."
    )
    amount_usd = serializers.CharField(help_text="Change to the balance, USD.")
    amount_nanousd = serializers.IntegerField(help_text="Change to the balance, nano-dollars.")
    balance_after_usd = serializers.CharField()
    balance_after_nanousd = serializers.IntegerField(
        help_text="The balance right after. On a day of usage, after its last charge."
    )
    request_count = serializers.IntegerField(
        help_text="Requests charged on a day of usage, and 0 on other rows."
    )
    description = serializers.CharField()


# The columns of `ledger_rows`, in SELECT order.
ROW_FIELDS = (
    "row_day",
    "row_kind",
    "row_id",
    "row_at",
    "row_amount",
    "row_balance_after",
    "row_requests",
    "row_description",
)


def ledger_rows(*, account: Account):
    """Return the account's credit history, newest first, as a queryset of dicts.

    Every transaction is a row, except usage charges: those become one row per UTC day
    and stretch between other transactions, with the sum and request count, grouped by
    the database. A day of usage carries
    the id of its last charge in `row_id` and no balance after it. Pass the rows shown
    to `ledger_rows_complete`, which looks that balance up.
    """
    # No ORDER BY inside the halves: a compound statement orders only as a whole.
    transactions = LedgerTransaction.objects.filter(account=account).order_by()
    utc_day = TruncDate("created_at", tzinfo=UTC)
    # Both halves annotate the same names in the same order, so the UNION lines up.
    singles = (
        transactions.exclude(kind=LedgerTransaction.Kind.USAGE)
        .annotate(
            row_day=utc_day,
            row_kind=F("kind"),
            row_id=F("id"),
            row_at=F("created_at"),
            row_amount=F("amount_nanousd"),
            row_balance_after=F("balance_after_nanousd"),
            row_requests=Value(0, output_field=IntegerField()),
            row_description=F("description"),
        )
        .values(*ROW_FIELDS)
    )
    # The last charge of a day is the one with the highest id: charges of one account are
    # written one at a time under the account lock, so ids follow the ledger's order.
    # A day's usage is split at every other transaction between its charges (grouped by
    # the id of the transaction before them), so each row's balance after is the one
    # before it plus its amount.
    previous_other = Subquery(
        LedgerTransaction.objects.filter(account=account, id__lt=OuterRef("id"))
        .exclude(kind=LedgerTransaction.Kind.USAGE)
        .order_by("-id")
        .values("id")[:1]
    )
    usage_days = (
        transactions.filter(kind=LedgerTransaction.Kind.USAGE)
        .annotate(row_day=utc_day, row_after_other=previous_other)
        .values("row_day", "row_after_other")
        .annotate(
            row_kind=Value(LedgerTransaction.Kind.USAGE.value, output_field=CharField()),
            row_id=Max("id"),
            row_at=Max("created_at"),
            # PostgreSQL sums bigints as numeric, and both halves of the UNION must be bigint.
            row_amount=Cast(Sum("amount_nanousd"), output_field=BigIntegerField()),
            row_balance_after=Value(None, output_field=BigIntegerField()),
            row_requests=Count("id"),
            row_description=Value("", output_field=CharField()),
        )
        .values(*ROW_FIELDS)
    )
    return singles.union(usage_days, all=True).order_by("-row_at", "-row_id")


def ledger_rows_complete(rows) -> list[dict]:
    """Turn rows of `ledger_rows` into TransactionSerializer's shape, in one more query.

    Looks up the balance after the last charge of each day of usage among `rows`.
    """
    rows = list(rows)
    usage = LedgerTransaction.Kind.USAGE
    last_charges = [row["row_id"] for row in rows if row["row_kind"] == usage]
    balances = dict(
        LedgerTransaction.objects.filter(pk__in=last_charges).values_list(
            "id", "balance_after_nanousd"
        )
        if last_charges
        else []
    )
    completed = []
    for row in rows:
        is_usage_day = row["row_kind"] == usage
        balance_after = balances[row["row_id"]] if is_usage_day else row["row_balance_after"]
        completed.append(
            {
                "id": None if is_usage_day else row["row_id"],
                "kind": row["row_kind"],
                "date": row["row_day"],
                "created_at": row["row_at"],
                "amount_usd": format_usd(row["row_amount"]),
                "amount_nanousd": row["row_amount"],
                "balance_after_usd": format_usd(balance_after),
                "balance_after_nanousd": balance_after,
                "request_count": row["row_requests"],
                "description": row["row_description"],
            }
        )
    return completed


class CheckoutSessionView(APIView):
    @extend_schema(
        request=CheckoutSessionRequestSerializer,
        responses={201: CheckoutSessionSerializer},
        summary="Start a Stripe Checkout Session to buy credits",
    )
    def post(self, request):
        account = request_account(request)
        serializer = CheckoutSessionRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        amount = serializer.validated_data["amount"]
        try:
            session = checkout_session_create(account=account, amount_cents=amount, user=None)
        except CreditsError as error:
            raise serializers.ValidationError({"amount": [str(error)]}) from error
        return Response({**session, "amount": amount}, status=status.HTTP_201_CREATED)


def balance_payload(*, account) -> dict:
    now = timezone.now()
    balance = account_balance(account_id=account.pk, at=now)
    lots = (
        CreditLot.objects.for_account(account)
        .filter(remaining_nanousd__gt=0, expires_at__gt=now)
        .exclude(status=CreditLot.Status.VOIDED)
        .draw_down_order()
    )
    threshold = account.low_balance_threshold_nanousd
    return {
        "balance_usd": format_usd(balance.balance_nanousd),
        "balance_nanousd": balance.balance_nanousd,
        "balance_cents": cents_from_nanousd(balance.balance_nanousd),
        "debt_usd": format_usd(balance.debt_nanousd),
        "debt_nanousd": balance.debt_nanousd,
        "low_balance_threshold_usd": format_usd(threshold) if threshold is not None else None,
        "low_balance_threshold_nanousd": threshold,
        "lots": LotSerializer(lots, many=True, context={"now": now}).data,
    }


class BalanceView(APIView):
    @extend_schema(responses=BalanceSerializer, summary="Balance, debt and unexpired lots")
    def get(self, request):
        account = request_account(request)
        return Response(balance_payload(account=account))

    @extend_schema(
        request=BalanceSettingsSerializer,
        responses=BalanceSerializer,
        summary="Set the low-balance alert threshold",
        description="Owners and admins of the account get an email when the balance drops "
        "below `low_balance_threshold_usd`, once per drop; the alert re-arms when the "
        "balance is back at or above it. Returns the balance as GET does.",
        examples=[
            OpenApiExample("Alert below USD 5.00", value={"low_balance_threshold_usd": "5.00"}),
            OpenApiExample("Turn the alert off", value={"low_balance_threshold_usd": None}),
        ],
    )
    def patch(self, request):
        account = request_account(request)
        serializer = BalanceSettingsSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        threshold = serializer.validated_data["low_balance_threshold_usd"]
        try:
            account = account_low_balance_threshold_set(
                account=account, threshold_nanousd=threshold
            )
        except CreditsError as error:
            field = "low_balance_threshold_usd"
            raise serializers.ValidationError({field: [str(error)]}) from error
        return Response(balance_payload(account=account))


class LotListView(generics.ListAPIView):
    serializer_class = LotSerializer

    def get_queryset(self):
        return CreditLot.objects.for_account(request_account(self.request)).order_by(
            "-created_at", "-id"
        )

    def get_serializer_context(self):
        return {**super().get_serializer_context(), "now": timezone.now()}


class TransactionListView(generics.ListAPIView):
    serializer_class = TransactionSerializer

    def get_queryset(self):
        return ledger_rows(account=request_account(self.request))

    @extend_schema(
        summary="Credit history, newest first, with usage summed per UTC day",
        description="Purchases, grants, refunds, voids, expiries and every other transaction "
        "are one row each. Usage charges are one row per UTC day: the day's total, its "
        "request count, and the balance after its last charge.",
    )
    def get(self, request, *args, **kwargs):
        page = self.paginate_queryset(self.get_queryset())
        rows = TransactionSerializer(ledger_rows_complete(page), many=True).data
        return self.get_paginated_response(rows)
