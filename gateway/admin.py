from django.contrib import admin

from credits.money import format_usd
from gateway.models import (
    AccessKey,
    CustomProvider,
    ModelPrice,
    ProviderCredential,
    UsageRecord,
    UsageRollup,
)
from gateway.providers import custom_provider_delete, provider_credential_delete
from gateway.routing import price_catalog_evict_on_commit


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

    # The gateway caches the price table; every change makes it reload.
    def save_model(self, request, obj, form, change) -> None:
        super().save_model(request, obj, form, change)
        price_catalog_evict_on_commit()

    def delete_model(self, request, obj) -> None:
        super().delete_model(request, obj)
        price_catalog_evict_on_commit()

    def delete_queryset(self, request, queryset) -> None:
        super().delete_queryset(request, queryset)
        price_catalog_evict_on_commit()


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


@admin.register(ProviderCredential)
class ProviderCredentialAdmin(admin.ModelAdmin):
    """Accounts' own provider keys, by last four characters only; the secret is never shown."""

    list_display = ["provider", "display", "account", "set_at", "created_at"]
    list_filter = ["provider"]
    search_fields = ["account__slug"]
    list_select_related = ["account"]
    fields = ["account", "provider", "last_four", "set_at", "set_by", "created_at"]
    readonly_fields = fields
    actions = ["delete_keys"]

    def has_add_permission(self, request) -> bool:
        # Only the account's members know the key.
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        # Deleting goes through the action, which makes the gateway stop using the key.
        return False

    @admin.action(description="Delete the selected keys (requests fall back to built-in)")
    def delete_keys(self, request, queryset) -> None:
        count = 0
        for credential in queryset:
            provider_credential_delete(credential=credential)
            count += 1
        self.message_user(request, f"Deleted {count} provider keys.")


@admin.register(CustomProvider)
class CustomProviderAdmin(admin.ModelAdmin):
    """Custom providers; a stored key shows as its last four characters only."""

    list_display = ["name", "account", "base_url", "api_format", "key_display", "created_at"]
    list_filter = ["api_format"]
    search_fields = ["name", "base_url", "account__slug"]
    list_select_related = ["account"]
    fields = [
        "account",
        "name",
        "base_url",
        "api_format",
        "key_last_four",
        "key_set_at",
        "model_names",
        "created_at",
        "updated_at",
        "created_by",
    ]
    readonly_fields = fields
    actions = ["delete_providers"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.action(description="Delete the selected custom providers")
    def delete_providers(self, request, queryset) -> None:
        count = 0
        for provider in queryset:
            custom_provider_delete(provider=provider)
            count += 1
        self.message_user(request, f"Deleted {count} custom providers.")


@admin.register(UsageRollup)
class UsageRollupAdmin(admin.ModelAdmin):
    """Usage summed per hour and day; read-only, because the rollup task rewrites it."""

    list_display = [
        "window_start",
        "period",
        "account",
        "provider",
        "model",
        "access_key",
        "request_count",
        "failed_count",
        "cost",
        "computed_at",
    ]
    list_filter = ["period", "provider"]
    search_fields = ["account__slug", "model"]
    date_hierarchy = "window_start"
    list_select_related = ["account", "access_key"]

    @admin.display(description="Cost (USD)", ordering="cost_nanousd")
    def cost(self, rollup: UsageRollup) -> str:
        return format_usd(rollup.cost_nanousd)

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in UsageRollup._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
