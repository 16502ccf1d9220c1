from django.contrib import admin

from credits.money import format_usd
from gateway.models import AccessKey, ModelPrice, UsageRecord


@admin.register(AccessKey)
class AccessKeyAdmin(admin.ModelAdmin):
    """Keys by prefix and last four characters only; the hash is never shown."""

    list_display = [
        "name",
        "display",
        "account",
        "scopes",
        "created_at",
        "last_used_at",
        "revoked_at",
    ]
    list_filter = ["revoked_at"]
    search_fields = ["name", "prefix", "account__slug"]
    list_select_related = ["account"]
    fields = [
        "account",
        "name",
        "prefix",
        "last_four",
        "scopes",
        "allowed_providers",
        "allowed_models",
        "spend_limit_nanousd",
        "spend_limit_period",
        "requests_per_minute",
        "created_at",
        "created_by",
        "expires_at",
        "revoked_at",
        "last_used_at",
    ]
    readonly_fields = fields

    def has_add_permission(self, request) -> bool:
        # Keys are created by their owners, who are the only ones to see the key.
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = [
        "provider",
        "model",
        "input_nanousd_per_mtok",
        "output_nanousd_per_mtok",
        "cache_read_nanousd_per_mtok",
        "cache_write_nanousd_per_mtok",
        "effective_from",
    ]
    list_filter = ["provider"]
    search_fields = ["model"]


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = [
        "request_id",
        "attempt",
        "account",
        "provider",
        "model",
        "status",
        "input_tokens",
        "output_tokens",
        "cost",
        "usage_estimated",
        "created_at",
    ]
    list_filter = ["status", "provider", "key_source", "streamed", "usage_estimated"]
    search_fields = ["request_id", "account__slug", "model"]
    date_hierarchy = "created_at"
    list_select_related = ["account"]

    @admin.display(description="Cost (USD)", ordering="cost_nanousd")
    def cost(self, record: UsageRecord) -> str:
        return format_usd(record.cost_nanousd)

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in UsageRecord._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
