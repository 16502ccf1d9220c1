from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin

from accounts.models import Account, Membership, User
from credits.admin import GrantForm, ReasonForm, SupportActMixin, staff_action_page
from credits.models import AuditRecord
from credits.money import format_usd, format_usd_short
from credits.services import account_freeze, account_unfreeze, promotional_credit_grant
from gateway.models import AccessKey


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    ordering = ["email"]
    list_display = ["email", "first_name", "last_name", "is_staff", "date_joined"]
    search_fields = ["email", "first_name", "last_name"]
    fieldsets = (
        (None, {"fields": ("email", "password")}),
        ("Personal info", {"fields": ("first_name", "last_name")}),
        (
            "Permissions",
            {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")},
        ),
        ("Important dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = (
        (None, {"classes": ("wide",), "fields": ("email", "password1", "password2")}),
    )


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


class AccessKeyInline(admin.TabularInline):
    """Show keys by prefix and last four characters only, never their hash."""

    model = AccessKey
    extra = 0
    fields = ["name", "key", "scopes", "created_at", "last_used_at", "revoked_at"]
    readonly_fields = fields
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="Key")
    def key(self, access_key: AccessKey) -> str:
        return access_key.display


class AuditRecordInline(admin.TabularInline):
    model = AuditRecord
    extra = 0
    fields = ["created_at", "action", "actor_email", "lot", "reason"]
    readonly_fields = fields
    can_delete = False
    show_change_link = True
    ordering = ["-created_at", "-id"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Account)
class AccountAdmin(SupportActMixin, admin.ModelAdmin):
    list_display = ["name", "slug", "created_at", "is_frozen", "debt"]
    list_filter = ["is_frozen"]
    search_fields = ["name", "slug", "members__email"]
    # Freezing and credits change only through the audited actions of the list page.
    readonly_fields = [
        "created_at",
        "is_frozen",
        "debt_nanousd",
        "low_balance_threshold",
        "low_balance_alerted_at",
    ]
    exclude = ["low_balance_threshold_nanousd"]
    inlines = [MembershipInline, AccessKeyInline, AuditRecordInline]
    actions = ["grant_credits", "freeze", "unfreeze"]

    @admin.display(description="Debt (USD)")
    def debt(self, account: Account) -> str:
        return format_usd_short(account.debt_nanousd)

    @admin.display(description="Low-balance alert below (USD)")
    def low_balance_threshold(self, account: Account) -> str:
        threshold = account.low_balance_threshold_nanousd
        return format_usd(threshold) if threshold is not None else "off"

    @admin.action(description="Grant promotional credits", permissions=["support_act"])
    def grant_credits(self, request, queryset):
        def act(account: Account, data: dict) -> str:
            lot = promotional_credit_grant(
                account=account,
                amount_nanousd=data["amount"],
                reason=data["reason"],
                actor=request.user,
                expires_at=data["expires_at"],
                idempotency_key=f"staff-grant:{account.pk}:{data['token']}",
            )
            return (
                f"Granted {format_usd(lot.original_nanousd)} USD to {account} "
                f"as lot {lot.pk}, expiring {lot.expires_at:%Y-%m-%d %H:%M %Z}."
            )

        return staff_action_page(
            self,
            request,
            queryset,
            form_class=GrantForm,
            action="grant_credits",
            title="Grant promotional credits",
            intro="Add a promotional lot to each of these accounts.",
            act=act,
        )

    @admin.action(description="Freeze selected accounts", permissions=["support_act"])
    def freeze(self, request, queryset):
        def act(account: Account, data: dict) -> str:
            record = account_freeze(account=account, reason=data["reason"], actor=request.user)
            return f"Froze {account}." if record else f"{account} was frozen already."

        return staff_action_page(
            self,
            request,
            queryset,
            form_class=ReasonForm,
            action="freeze",
            title="Freeze accounts",
            intro="Frozen accounts cannot call the gateway, change anything through the API "
            "or buy credits. Their keys stop working at once.",
            act=act,
        )

    @admin.action(description="Unfreeze selected accounts", permissions=["support_act"])
    def unfreeze(self, request, queryset):
        def act(account: Account, data: dict) -> str:
            record = account_unfreeze(account=account, reason=data["reason"], actor=request.user)
            return f"Unfroze {account}." if record else f"{account} was not frozen."

        return staff_action_page(
            self,
            request,
            queryset,
            form_class=ReasonForm,
            action="unfreeze",
            title="Unfreeze accounts",
            intro="The accounts' keys work again at once.",
            act=act,
        )


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "account", "role", "created_at"]
    list_filter = ["role"]
    search_fields = ["user__email", "account__name", "account__slug"]
    autocomplete_fields = ["user", "account"]
