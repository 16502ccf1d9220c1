"""Support staff's view of lots and the ledger; the ledger is append-only, so read-only here."""

from django.contrib import admin

from credits.models import CheckoutPurchase, CreditLot, LedgerEntry, LedgerTransaction
from credits.money import format_usd


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class LedgerEntryInline(admin.TabularInline):
    model = LedgerEntry
    extra = 0
    fields = ["lot", "amount_nanousd", "created_at"]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(CreditLot)
class CreditLotAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "account",
        "source",
        "status",
        "original",
        "remaining",
        "created_at",
        "expires_at",
        "expired_at",
    ]
    list_filter = ["source", "status"]
    search_fields = ["account__slug", "account__name", "stripe_checkout_session_id"]
    date_hierarchy = "created_at"
    list_select_related = ["account"]

    @admin.display(description="Original (USD)", ordering="original_nanousd")
    def original(self, lot: CreditLot) -> str:
        return format_usd(lot.original_nanousd)

    @admin.display(description="Remaining (USD)", ordering="remaining_nanousd")
    def remaining(self, lot: CreditLot) -> str:
        return format_usd(lot.remaining_nanousd)


@admin.register(LedgerTransaction)
class LedgerTransactionAdmin(ReadOnlyAdmin):
    list_display = ["id", "account", "kind", "amount", "balance_after", "created_at", "request_id"]
    list_filter = ["kind"]
    search_fields = ["account__slug", "request_id", "idempotency_key"]
    date_hierarchy = "created_at"
    list_select_related = ["account"]
    inlines = [LedgerEntryInline]

    @admin.display(description="Amount (USD)", ordering="amount_nanousd")
    def amount(self, entry: LedgerTransaction) -> str:
        return format_usd(entry.amount_nanousd)

    @admin.display(description="Balance after (USD)")
    def balance_after(self, entry: LedgerTransaction) -> str:
        return format_usd(entry.balance_after_nanousd)


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["id", "account", "transaction", "lot", "amount_nanousd", "created_at"]
    search_fields = ["account__slug", "transaction__request_id"]
    list_select_related = ["account", "transaction", "lot"]


@admin.register(CheckoutPurchase)
class CheckoutPurchaseAdmin(ReadOnlyAdmin):
    list_display = ["stripe_session_id", "account", "amount_cents", "status", "created_at", "lot"]
    list_filter = ["status"]
    search_fields = ["stripe_session_id", "account__slug"]
    list_select_related = ["account"]
