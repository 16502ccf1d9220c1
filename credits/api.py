from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from credits.models import CreditLot, LedgerTransaction
from credits.money import cents_from_nanousd, format_usd
from credits.services import CreditsError, account_balance, checkout_session_create
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
            "spendable",
        ]

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
    lots = LotSerializer(many=True)


class TransactionSerializer(serializers.ModelSerializer):
    amount_usd = serializers.SerializerMethodField()
    balance_after_usd = serializers.SerializerMethodField()

    class Meta:
        model = LedgerTransaction
        fields = [
            "id",
            "kind",
            "amount_usd",
            "amount_nanousd",
            "balance_after_usd",
            "balance_after_nanousd",
            "created_at",
            "request_id",
            "description",
        ]

    def get_amount_usd(self, entry: LedgerTransaction) -> str:
        return format_usd(entry.amount_nanousd)

    def get_balance_after_usd(self, entry: LedgerTransaction) -> str:
        return format_usd(entry.balance_after_nanousd)


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
    return {
        "balance_usd": format_usd(balance.balance_nanousd),
        "balance_nanousd": balance.balance_nanousd,
        "balance_cents": cents_from_nanousd(balance.balance_nanousd),
        "debt_usd": format_usd(balance.debt_nanousd),
        "debt_nanousd": balance.debt_nanousd,
        "lots": LotSerializer(lots, many=True, context={"now": now}).data,
    }


class BalanceView(APIView):
    @extend_schema(responses=BalanceSerializer, summary="Balance, debt and unexpired lots")
    def get(self, request):
        account = request_account(request)
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
        return LedgerTransaction.objects.filter(account=request_account(self.request))
