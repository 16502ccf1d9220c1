"""Access key and usage pages of the dashboard."""

import logging
import secrets

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers, patch_cache_control
from django.views import View

from accounts.mixins import AccountRequiredMixin, account_objects
from credits.views import usd_short
from gateway.forms import (
    AccessKeyCreateForm,
    CustomProviderEditForm,
    CustomProviderForm,
    ProviderKeyForm,
)
from gateway.models import AccessKey, CustomProvider, ModelPrice, ProviderCredential, UsageRecord
from gateway.providers import (
    BUILTIN_PROVIDER_NAMES,
    ProviderError,
    custom_provider_create,
    custom_provider_delete,
    custom_provider_update,
    provider_credential_delete,
    provider_credential_set,
)
from gateway.rollups import usage_charts
from gateway.routing import price_list
from gateway.services import AccessKeyError, access_key_create, access_key_revoke

logger = logging.getLogger(__name__)

USAGE_PAGE_SIZE = 50


def usage_rows(records) -> list[dict]:
    """Pair each usage record with its cost formatted for people."""
    return [{"record": record, "cost": usd_short(record.cost_nanousd)} for record in records]


PERIOD_SUFFIXES = {
    AccessKey.SpendLimitPeriod.DAILY: " a day",
    AccessKey.SpendLimitPeriod.WEEKLY: " a week",
    AccessKey.SpendLimitPeriod.MONTHLY: " a month",
    AccessKey.SpendLimitPeriod.NEVER: " in total",
}


def key_limits_text(access_key: AccessKey) -> str:
    """Describe a key's limits for people: "$25.00 a month, 60 requests/min" or "None"."""
    parts = []
    if access_key.spend_limit_nanousd is not None:
        suffix = PERIOD_SUFFIXES.get(access_key.spend_limit_period, "")
        parts.append(usd_short(access_key.spend_limit_nanousd) + suffix)
    if access_key.requests_per_minute is not None:
        parts.append(f"{access_key.requests_per_minute} requests/min")
    return ", ".join(parts) or "None"


def _keys_page(request, form: AccessKeyCreateForm, *, created=None, status: int = 200):
    keys = list(account_objects(AccessKey, request.account).order_by("-created_at", "-id"))
    for access_key in keys:
        access_key.limits_text = key_limits_text(access_key)
    context = {
        "keys": keys,
        "form": form,
        "created": created,
        "now": timezone.now(),
    }
    return render(request, "gateway/keys.html", context, status=status)


# Session key: the form tokens already used, newest last, with the key each created.
USED_KEY_FORM_TOKENS = "used_key_form_tokens"
USED_KEY_FORM_TOKENS_KEPT = 20


def _new_key_form() -> AccessKeyCreateForm:
    return AccessKeyCreateForm(initial={"form_token": secrets.token_urlsafe(16)})


class KeysView(AccountRequiredMixin, View):
    def get(self, request):
        return _keys_page(request, _new_key_form())


class KeyCreateView(AccountRequiredMixin, View):
    """Create a key and show its secret in this one response.

    The secret goes into the rendered page only: not the session, the messages
    framework or a redirect, so reloading the list never shows it again.
    """

    http_method_names = ["post"]

    def post(self, request):
        form = AccessKeyCreateForm(request.POST)
        token = request.POST.get("form_token", "")
        used: list[list] = request.session.get(USED_KEY_FORM_TOKENS, [])
        earlier = next(
            (key_id for used_token, key_id in used if token and used_token == token), None
        )
        if earlier is not None:
            # The browser sent this form again, usually by reloading the result page.
            messages.info(
                request,
                "That form was already submitted, so no second key was created. The key's "
                "secret was shown once; revoke it and create a new one if it was not copied.",
            )
            response = HttpResponseRedirect(reverse("keys"))
            response.status_code = 303
            return response
        if not form.is_valid():
            return _keys_page(request, form)
        try:
            created = access_key_create(
                account=request.account,
                name=form.cleaned_data["name"],
                scopes=form.cleaned_data["scopes"],
                created_by=request.user,
                expires_at=form.expires_at,
                spend_limit_nanousd=form.cleaned_data["spend_limit"],
                spend_limit_period=form.cleaned_data["spend_limit_period"],
                requests_per_minute=form.cleaned_data["requests_per_minute"],
            )
        except AccessKeyError as error:
            logger.info("Rejected access key for account %s: %s", request.account.pk, error)
            form.add_error(None, str(error))
            return _keys_page(request, form)

        if token:
            used = [*used, [token, created.access_key.pk]][-USED_KEY_FORM_TOKENS_KEPT:]
            request.session[USED_KEY_FORM_TOKENS] = used
        response = _keys_page(request, _new_key_form(), created=created, status=201)
        # Keep the page with the secret out of the browser cache and the back-forward cache.
        add_never_cache_headers(response)
        patch_cache_control(response, no_store=True)
        return response


class KeyRevokeView(AccountRequiredMixin, View):
    http_method_names = ["post"]

    def post(self, request, key_id: int):
        access_key = get_object_or_404(account_objects(AccessKey, request.account), pk=key_id)
        access_key_revoke(access_key=access_key)
        access_key.limits_text = key_limits_text(access_key)
        if request.htmx:
            # htmx swaps only this row, so the rest of the page stays as it is.
            context = {"key": access_key, "now": timezone.now()}
            return render(request, "gateway/_key_row.html", context)
        messages.success(request, f"Revoked the key {access_key.name} ({access_key.display}).")
        response = HttpResponseRedirect(reverse("keys"))
        response.status_code = 303
        return response


class UsageView(AccountRequiredMixin, View):
    # The charts show this many UTC days, today included.
    chart_days = 30

    def get(self, request):
        records = account_objects(UsageRecord, request.account).select_related("access_key")
        paginator = Paginator(records.order_by("-created_at", "-id"), USAGE_PAGE_SIZE)
        page = paginator.get_page(request.GET.get("page"))
        charts = usage_charts(account=request.account, days=self.chart_days, at=timezone.now())
        context = {"page": page, "rows": usage_rows(page.object_list), "charts": charts}
        return render(request, "gateway/usage.html", context)


# Providers: the account's own OpenAI and Anthropic keys, and custom providers.


def _see_other(url_name: str) -> HttpResponseRedirect:
    response = HttpResponseRedirect(reverse(url_name))
    response.status_code = 303
    return response


def _add_provider_error(request, form, error: ProviderError) -> None:
    """Attach a service error to its form field, or to the form when the field is not on it."""
    # Provider errors never contain a key, so the message is safe to log.
    logger.info("Rejected a provider change for account %s: %s", request.account.pk, error)
    form.add_error(error.field if error.field in form.fields else None, str(error))


def _providers_page(
    request,
    *,
    key_forms: dict[str, ProviderKeyForm] | None = None,
    custom_form: CustomProviderForm | None = None,
):
    credentials = {
        credential.provider: credential
        for credential in account_objects(ProviderCredential, request.account)
    }
    key_forms = key_forms or {}
    builtin = [
        {
            "provider": provider,
            "label": label,
            "credential": credentials.get(provider),
            "form": key_forms.get(provider) or ProviderKeyForm(prefix=provider),
        }
        for provider, label in ModelPrice.Provider.choices
    ]
    context = {
        "builtin": builtin,
        "prices": price_list(at=timezone.now()),
        "custom_providers": account_objects(CustomProvider, request.account).order_by("name"),
        "custom_form": custom_form or CustomProviderForm(),
    }
    return render(request, "gateway/providers.html", context)


class ProvidersView(AccountRequiredMixin, View):
    def get(self, request):
        return _providers_page(request)


class ProviderKeySetView(AccountRequiredMixin, View):
    """Store or replace the account's own key for `openai` or `anthropic`."""

    http_method_names = ["post"]

    def post(self, request, provider: str):
        if provider not in BUILTIN_PROVIDER_NAMES:
            raise Http404("No such provider.")
        form = ProviderKeyForm(request.POST, prefix=provider)
        if form.is_valid():
            try:
                credential = provider_credential_set(
                    account=request.account,
                    provider=provider,
                    api_key=form.cleaned_data["api_key"],
                    set_by=request.user,
                )
            except ProviderError as error:
                _add_provider_error(request, form, error)
            else:
                messages.success(
                    request,
                    f"Saved the {credential.get_provider_display()} key ending in "
                    f"{credential.last_four}. {provider}: models now use it and are charged "
                    "only the fee.",
                )
                return _see_other("providers")
        return _providers_page(request, key_forms={provider: form})


class ProviderKeyDeleteView(AccountRequiredMixin, View):
    http_method_names = ["post"]

    def post(self, request, provider: str):
        credential = get_object_or_404(
            account_objects(ProviderCredential, request.account), provider=provider
        )
        label = credential.get_provider_display()
        provider_credential_delete(credential=credential)
        messages.success(
            request,
            f"Deleted the {label} key. {provider}: models use built-in inference again.",
        )
        return _see_other("providers")


class CustomProviderCreateView(AccountRequiredMixin, View):
    http_method_names = ["post"]

    def post(self, request):
        form = CustomProviderForm(request.POST)
        if form.is_valid():
            try:
                provider = custom_provider_create(
                    account=request.account,
                    name=form.cleaned_data["name"],
                    base_url=form.cleaned_data["base_url"],
                    api_format=form.cleaned_data["api_format"],
                    api_key=form.cleaned_data["api_key"] or None,
                    model_names=form.model_names,
                    created_by=request.user,
                )
            except ProviderError as error:
                _add_provider_error(request, form, error)
            else:
                messages.success(request, f"Added the custom provider {provider.name}.")
                return _see_other("providers")
        return _providers_page(request, custom_form=form)


class CustomProviderEditView(AccountRequiredMixin, View):
    def _render(self, request, provider: CustomProvider, form: CustomProviderEditForm):
        context = {"provider": provider, "form": form}
        return render(request, "gateway/providers_custom_edit.html", context)

    def get(self, request, provider_id: int):
        provider = get_object_or_404(
            account_objects(CustomProvider, request.account), pk=provider_id
        )
        form = CustomProviderEditForm(
            initial={
                "name": provider.name,
                "base_url": provider.base_url,
                "api_format": provider.api_format,
                "models": ", ".join(provider.model_names),
            }
        )
        return self._render(request, provider, form)

    def post(self, request, provider_id: int):
        provider = get_object_or_404(
            account_objects(CustomProvider, request.account), pk=provider_id
        )
        form = CustomProviderEditForm(request.POST)
        if form.is_valid():
            try:
                provider = custom_provider_update(
                    provider=provider,
                    name=form.cleaned_data["name"],
                    base_url=form.cleaned_data["base_url"],
                    api_format=form.cleaned_data["api_format"],
                    model_names=form.model_names,
                    api_key=form.cleaned_data["api_key"] or None,
                    key_clear=form.cleaned_data["key_clear"],
                )
            except ProviderError as error:
                _add_provider_error(request, form, error)
            else:
                messages.success(request, f"Saved the custom provider {provider.name}.")
                return _see_other("providers")
        return self._render(request, provider, form)


class CustomProviderDeleteView(AccountRequiredMixin, View):
    http_method_names = ["post"]

    def post(self, request, provider_id: int):
        provider = get_object_or_404(
            account_objects(CustomProvider, request.account), pk=provider_id
        )
        name = provider.name
        custom_provider_delete(provider=provider)
        messages.success(request, f"Deleted the custom provider {name}.")
        return _see_other("providers")
