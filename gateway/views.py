"""Access key and usage pages of the dashboard."""

import logging

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers, patch_cache_control
from django.views import View

from accounts.mixins import AccountRequiredMixin, account_objects
from credits.views import usd_short
from gateway.forms import AccessKeyCreateForm
from gateway.models import AccessKey, UsageRecord
from gateway.services import AccessKeyError, access_key_create, access_key_revoke

logger = logging.getLogger(__name__)

USAGE_PAGE_SIZE = 50


def usage_rows(records) -> list[dict]:
    """Pair each usage record with its cost formatted for people."""
    return [{"record": record, "cost": usd_short(record.cost_nanousd)} for record in records]


def _keys_page(request, form: AccessKeyCreateForm, *, created=None, status: int = 200):
    keys = account_objects(AccessKey, request.account).order_by("-created_at", "-id")
    context = {
        "keys": keys,
        "form": form,
        "created": created,
        "now": timezone.now(),
    }
    return render(request, "gateway/keys.html", context, status=status)


class KeysView(AccountRequiredMixin, View):
    def get(self, request):
        return _keys_page(request, AccessKeyCreateForm())


class KeyCreateView(AccountRequiredMixin, View):
    """Create a key and show its secret in this one response.

    The secret goes into the rendered page only: not the session, the messages
    framework or a redirect, so reloading the list never shows it again.
    """

    http_method_names = ["post"]

    def post(self, request):
        form = AccessKeyCreateForm(request.POST)
        if not form.is_valid():
            return _keys_page(request, form)
        try:
            created = access_key_create(
                account=request.account,
                name=form.cleaned_data["name"],
                scopes=form.cleaned_data["scopes"],
                created_by=request.user,
                expires_at=form.expires_at,
            )
        except AccessKeyError as error:
            logger.info("Rejected access key for account %s: %s", request.account.pk, error)
            form.add_error(None, str(error))
            return _keys_page(request, form)

        response = _keys_page(request, AccessKeyCreateForm(), created=created, status=201)
        # Keep the page with the secret out of the browser cache and the back-forward cache.
        add_never_cache_headers(response)
        patch_cache_control(response, no_store=True)
        return response


class KeyRevokeView(AccountRequiredMixin, View):
    http_method_names = ["post"]

    def post(self, request, key_id: int):
        access_key = get_object_or_404(account_objects(AccessKey, request.account), pk=key_id)
        access_key_revoke(access_key=access_key)
        if request.htmx:
            # htmx swaps only this row, so the rest of the page stays as it is.
            context = {"key": access_key, "now": timezone.now()}
            return render(request, "gateway/_key_row.html", context)
        messages.success(request, f"Revoked the key {access_key.name} ({access_key.display}).")
        response = HttpResponseRedirect(reverse("keys"))
        response.status_code = 303
        return response


class UsageView(AccountRequiredMixin, View):
    def get(self, request):
        records = account_objects(UsageRecord, request.account).select_related("access_key")
        paginator = Paginator(records.order_by("-created_at", "-id"), USAGE_PAGE_SIZE)
        page = paginator.get_page(request.GET.get("page"))
        context = {"page": page, "rows": usage_rows(page.object_list)}
        return render(request, "gateway/usage.html", context)
