"""Support staff's view of lots and the ledger; the ledger is append-only, so read-only here.

Staff change credits only through audited acts: actions that ask for a reason on an
intermediate page and call the services in credits/services/staff.py.
"""

import json
import uuid
from collections.abc import Callable

from django import forms
from django.apps import apps
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.template.response import TemplateResponse
from django.utils.html import format_html

from credits.models import (
    AuditRecord,
    CheckoutPurchase,
    CreditLot,
    LedgerEntry,
    LedgerTransaction,
)
from credits.money import format_usd
from credits.services import (
    CreditsError,
    credit_lot_expiry_extend,
    credit_lot_void,
    usd_amount_parse,
)

SUPPORT_ACT_PERMISSION = "credits.support_act"


class ReasonForm(forms.Form):
    reason = forms.CharField(
        max_length=AuditRecord._meta.get_field("reason").max_length,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Why; kept in the audit record.",
    )


class GrantForm(ReasonForm):
    amount = forms.CharField(
        label="Amount (USD)", max_length=24, help_text='Such as "10.00"; up to nine places.'
    )
    expires_at = forms.DateTimeField(
        required=False,
        help_text=f"YYYY-MM-DD HH:MM in {settings.TIME_ZONE}; one year from now if empty.",
    )
    # Makes a second submission of the same page a no-op instead of a second grant.
    token = forms.CharField(widget=forms.HiddenInput, max_length=64)

    field_order = ["amount", "expires_at", "reason"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["token"].initial = uuid.uuid4().hex

    def clean_amount(self) -> int:
        try:
            return usd_amount_parse(self.cleaned_data["amount"])
        except CreditsError as error:
            raise forms.ValidationError(str(error)) from error


class ExtendExpiryForm(ReasonForm):
    expires_at = forms.DateTimeField(
        label="New expiry", help_text=f"YYYY-MM-DD HH:MM in {settings.TIME_ZONE}."
    )

    field_order = ["expires_at", "reason"]


def staff_action_page(
    modeladmin: admin.ModelAdmin,
    request,
    queryset,
    *,
    form_class: type[forms.Form],
    action: str,
    title: str,
    intro: str,
    act: Callable[[object, dict], str],
) -> TemplateResponse | None:
    """Run an admin action that needs a form: show the form, then act on each object.

    `act(obj, cleaned_data)` calls one service and returns the message to show. A
    CreditsError becomes an error message for that object, which stays unchanged.
    Returns None when done, so the admin goes back to the list.
    """
    if request.POST.get("apply") == "yes":
        form = form_class(request.POST)
        if form.is_valid():
            for obj in queryset:
                try:
                    message = act(obj, form.cleaned_data)
                except CreditsError as error:
                    modeladmin.message_user(request, f"{obj}: {error}", messages.ERROR)
                else:
                    modeladmin.message_user(request, message, messages.SUCCESS)
            return None
    else:
        form = form_class()
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": title,
        "intro": intro,
        "submit_label": title,
        "form": form,
        "queryset": queryset,
        "action": action,
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "opts": modeladmin.model._meta,
    }
    return TemplateResponse(request, "admin/credits/staff_action.html", context)


class SupportActMixin:
    """Actions marked `permissions=["support_act"]` need the support-act permission."""

    def has_support_act_permission(self, request) -> bool:
        return request.user.has_perm(SUPPORT_ACT_PERMISSION)


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
class CreditLotAdmin(SupportActMixin, ReadOnlyAdmin):
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
        "expiry_reminder_sent_at",
    ]
    actions = ["extend_expiry", "void"]
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

    @admin.action(description="Extend the expiry of selected lots", permissions=["support_act"])
    def extend_expiry(self, request, queryset):
        def act(lot: CreditLot, data: dict) -> str:
            credit_lot_expiry_extend(
                lot_id=lot.pk,
                expires_at=data["expires_at"],
                reason=data["reason"],
                actor=request.user,
            )
            return f"Lot {lot.pk} now expires at {data['expires_at']:%Y-%m-%d %H:%M %Z}."

        return staff_action_page(
            self,
            request,
            queryset,
            form_class=ExtendExpiryForm,
            action="extend_expiry",
            title="Extend the expiry",
            intro="Move the expiry of these lots later. The ledger does not change.",
            act=act,
        )

    @admin.action(description="Void selected lots", permissions=["support_act"])
    def void(self, request, queryset):
        def act(lot: CreditLot, data: dict) -> str:
            voided = credit_lot_void(lot_id=lot.pk, reason=data["reason"], actor=request.user)
            return f"Voided lot {lot.pk}: {format_usd(-voided.amount_nanousd)} USD removed."

        return staff_action_page(
            self,
            request,
            queryset,
            form_class=ReasonForm,
            action="void",
            title="Void lots",
            intro="Remove what is left of these lots from the balance. This cannot be undone.",
            act=act,
        )


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


@admin.register(AuditRecord)
class AuditRecordAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "action", "account", "actor_email", "lot", "reason"]
    list_filter = ["action"]
    search_fields = ["account__slug", "account__name", "actor_email", "reason"]
    date_hierarchy = "created_at"
    list_select_related = ["account", "lot__account"]
    fields = [
        "created_at",
        "action",
        "account",
        "actor",
        "actor_email",
        "reason",
        "lot",
        "ledger_transaction",
        "before_state",
        "after_state",
    ]
    readonly_fields = fields

    @admin.display(description="Before")
    def before_state(self, record: AuditRecord) -> str:
        return format_html("<pre>{}</pre>", json.dumps(record.before, indent=2, sort_keys=True))

    @admin.display(description="After")
    def after_state(self, record: AuditRecord) -> str:
        return format_html("<pre>{}</pre>", json.dumps(record.after, indent=2, sort_keys=True))


# dj-stripe registers an admin page for each of its 41 models, most of them about
# Stripe features Tollbooth does not use (subscriptions, invoices, payouts, Connect).
# Support staff keep the ones that explain a purchase: the customer, the Checkout
# Session, the payment, refunds, disputes and webhook deliveries.
STRIPE_ADMIN_KEPT = {
    "Charge",
    "Customer",
    "Dispute",
    "Event",
    "PaymentIntent",
    "Refund",
    "Session",
    "WebhookEndpoint",
    "WebhookEventTrigger",
}


def _stripe_mirror_admin(model_admin: admin.ModelAdmin) -> type[admin.ModelAdmin]:
    """Return a subclass of dj-stripe's admin that cannot add or delete.

    These rows mirror objects in Stripe; one added or deleted here would not be in Stripe.
    """

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    return type(
        f"Mirror{type(model_admin).__name__}",
        (type(model_admin),),
        {
            "has_add_permission": has_add_permission,
            "has_delete_permission": has_delete_permission,
        },
    )


for stripe_model in apps.get_app_config("djstripe").get_models():
    if not admin.site.is_registered(stripe_model):
        continue
    model_admin = admin.site.get_model_admin(stripe_model)
    admin.site.unregister(stripe_model)
    if stripe_model.__name__ in STRIPE_ADMIN_KEPT:
        admin.site.register(stripe_model, _stripe_mirror_admin(model_admin))
