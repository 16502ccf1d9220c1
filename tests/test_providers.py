"""Provider services, the /api/providers REST API and the /providers/ dashboard page.

Upstream hosts are checked with the system resolver on literal addresses and `localhost`
only; `llm.example.com` resolves through the `public_dns` fixture to a public address.
Nothing here connects to any of these addresses.
"""

import ipaddress
import socket
from datetime import timedelta

import pytest
import time_machine
from cryptography.fernet import Fernet
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework import serializers
from rest_framework.test import APIClient

from gateway.crypto import SecretDecryptError, secret_decrypt
from gateway.models import CustomProvider, ModelPrice, ProviderCredential
from gateway.providers import (
    ProviderError,
    UpstreamAddressError,
    account_provider_config,
    address_is_public,
    custom_provider_create,
    custom_provider_delete,
    custom_provider_update,
    host_addresses,
    provider_credential_delete,
    provider_credential_set,
    provider_secrets_reencrypt,
    upstream_host_check,
    upstream_url_check,
)
from gateway.routing import price_catalog_evict_on_commit
from gateway.services import access_key_create

OPENAI_KEY = "sk-own-openai-key-0000000000000001234"
OPENAI_KEY_2 = "sk-own-openai-key-0000000000000005678"
CUSTOM_KEY = "custom-provider-secret-9999wxyz"
PUBLIC_HOST = "llm.example.com"
# A public address that the fixture returns for PUBLIC_HOST; nothing connects to it.
PUBLIC_ADDRESS = "1.2.3.4"
UNRESOLVABLE_HOST = "no-such-host.example.com"


@pytest.fixture
def public_dns(monkeypatch):
    """Resolve PUBLIC_HOST to a public address and UNRESOLVABLE_HOST to nothing, without DNS."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == PUBLIC_HOST:
            return [
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (PUBLIC_ADDRESS, 0))
            ]
        if host == UNRESOLVABLE_HOST:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def allow_private(settings):
    settings.GATEWAY_ALLOW_PRIVATE_UPSTREAMS = True


@pytest.fixture
def committed(django_capture_on_commit_callbacks):
    """Call a service and run its on-commit callbacks (cache eviction) at once."""

    def call(service, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return service(**kwargs)

    return call


def timestamp(value) -> str:
    return serializers.DateTimeField().to_representation(value)


def row_text(model, pk) -> str:
    """Return every stored column of a row as text, to look for leaked secrets."""
    return str(model.objects.filter(pk=pk).values().get())


def custom_provider(account, **overrides) -> CustomProvider:
    values = {
        "name": "groq",
        "base_url": f"https://{PUBLIC_HOST}/v1/",
        "api_format": "openai",
        "api_key": CUSTOM_KEY,
        "model_names": ["llama-3.3-70b", "mixtral"],
    }
    return custom_provider_create(account=account, **{**values, **overrides})


# Own keys: encryption at rest, replacement, deletion


def test_own_key_is_stored_encrypted_and_decrypts(owner):
    credential = provider_credential_set(
        account=owner.account, provider="openai", api_key=f"  {OPENAI_KEY}\n"
    )

    stored = ProviderCredential.objects.get(pk=credential.pk)
    assert OPENAI_KEY not in row_text(ProviderCredential, credential.pk)
    assert OPENAI_KEY[:-4] not in stored.encrypted_key
    assert secret_decrypt(stored.encrypted_key) == OPENAI_KEY
    assert stored.last_four == "1234"
    assert stored.provider == "openai"
    assert stored.account == owner.account
    assert OPENAI_KEY not in repr(account_provider_config(account_id=owner.account.pk))


def test_own_key_replace_keeps_one_row(owner, committed):
    first = committed(
        provider_credential_set, account=owner.account, provider="openai", api_key=OPENAI_KEY
    )
    assert account_provider_config(account_id=owner.account.pk).own_keys == {"openai": OPENAI_KEY}

    second = committed(
        provider_credential_set,
        account=owner.account,
        provider="openai",
        api_key=OPENAI_KEY_2,
        set_by=owner.user,
    )

    assert second.pk == first.pk
    stored = ProviderCredential.objects.get(account=owner.account)
    assert secret_decrypt(stored.encrypted_key) == OPENAI_KEY_2
    assert stored.last_four == "5678"
    assert stored.set_at > first.set_at
    assert stored.created_at == first.created_at
    assert stored.set_by == owner.user
    # The gateway's cached configuration was evicted on commit.
    assert account_provider_config(account_id=owner.account.pk).own_keys == {
        "openai": OPENAI_KEY_2
    }


def test_deleting_own_key_removes_it_from_the_gateway(owner, committed):
    credential = committed(
        provider_credential_set, account=owner.account, provider="anthropic", api_key=OPENAI_KEY
    )
    assert account_provider_config(account_id=owner.account.pk).own_keys == {
        "anthropic": OPENAI_KEY
    }

    committed(provider_credential_delete, credential=credential)

    assert not ProviderCredential.objects.exists()
    assert account_provider_config(account_id=owner.account.pk).own_keys == {}


@pytest.mark.parametrize(
    ("provider", "api_key", "field"),
    [
        ("openai", "", "api_key"),
        ("openai", "short", "api_key"),
        ("openai", "sk-with a space-000000", "api_key"),
        ("openai", "sk-non-ascii-é-0000000", "api_key"),
        ("mistral", OPENAI_KEY, "provider"),
    ],
)
def test_own_key_rejects_bad_input(owner, provider, api_key, field):
    with pytest.raises(ProviderError) as caught:
        provider_credential_set(account=owner.account, provider=provider, api_key=api_key)
    assert caught.value.field == field
    assert OPENAI_KEY not in str(caught.value)
    assert not ProviderCredential.objects.exists()


def test_encryption_key_rotation_reencrypts(owner, settings):
    old_key = Fernet.generate_key().decode()
    new_key = Fernet.generate_key().decode()
    settings.GATEWAY_ENCRYPTION_KEY = old_key
    settings.GATEWAY_ALLOW_PRIVATE_UPSTREAMS = True
    credential = provider_credential_set(
        account=owner.account, provider="openai", api_key=OPENAI_KEY
    )
    provider = custom_provider(owner.account, base_url="http://127.0.0.1:9/v1")
    old_tokens = {
        ProviderCredential: ProviderCredential.objects.get(pk=credential.pk).encrypted_key,
        CustomProvider: CustomProvider.objects.get(pk=provider.pk).encrypted_key,
    }

    settings.GATEWAY_ENCRYPTION_KEY = f"{new_key},{old_key}"
    assert secret_decrypt(old_tokens[ProviderCredential]) == OPENAI_KEY
    assert provider_secrets_reencrypt() == 2

    settings.GATEWAY_ENCRYPTION_KEY = new_key
    for old_token in old_tokens.values():
        with pytest.raises(SecretDecryptError):
            secret_decrypt(old_token)
    assert secret_decrypt(ProviderCredential.objects.get().encrypted_key) == OPENAI_KEY
    assert secret_decrypt(CustomProvider.objects.get().encrypted_key) == CUSTOM_KEY


# Upstream addresses


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "localhost"])
def test_non_public_hosts_are_rejected(host, settings):
    settings.GATEWAY_ALLOW_PRIVATE_UPSTREAMS = False
    with pytest.raises(UpstreamAddressError) as caught:
        upstream_host_check(host)
    assert caught.value.field == "base_url"
    assert str(caught.value) == (
        f"The host `{host}` resolves to a private, loopback, link-local or otherwise "
        "non-public address. Custom providers must be reachable on the public internet "
        "unless the operator allows private upstreams."
    )


def test_localhost_resolves_to_loopback_only():
    addresses = host_addresses("localhost")
    assert addresses
    assert all(address.is_loopback for address in addresses)
    assert not any(address_is_public(address) for address in addresses)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("1.2.3.4", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:1.2.3.4", True),
        ("64:ff9b::a01:203", False),
    ],
)
def test_address_is_public(address, public):
    assert address_is_public(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/v1",
        "http://10.0.0.5/v1",
        "http://169.254.169.254/latest",
        "http://[::1]:9100",
        "http://localhost:9100/v1",
    ],
)
def test_upstream_url_check_rejects_non_public_urls(url, settings):
    settings.GATEWAY_ALLOW_PRIVATE_UPSTREAMS = False
    with pytest.raises(UpstreamAddressError):
        upstream_url_check(url)


def test_upstream_url_check_reports_unresolvable_host(public_dns):
    with pytest.raises(UpstreamAddressError) as caught:
        upstream_url_check(f"https://{UNRESOLVABLE_HOST}/v1")
    assert str(caught.value) == f"The host `{UNRESOLVABLE_HOST}` could not be resolved."


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "base_url is required."),
        ("ftp://llm.example.com/v1", "base_url must be an http or https URL with a host"),
        ("llm.example.com/v1", "base_url must be an http or https URL with a host"),
        ("https://user:pw@llm.example.com/v1", "base_url must not contain a user name"),
        ("https://llm.example.com/v1?x=1", "base_url must not have a query or a fragment."),
        ("https://llm.example.com:99999/v1", "base_url is not a valid URL."),
    ],
)
def test_upstream_url_check_rejects_malformed_urls(url, message, public_dns):
    with pytest.raises(ProviderError) as caught:
        upstream_url_check(url)
    assert str(caught.value).startswith(message)
    assert caught.value.field == "base_url"


def test_upstream_url_check_accepts_public_host(public_dns):
    assert upstream_url_check(f" https://{PUBLIC_HOST}/v1/ ") == f"https://{PUBLIC_HOST}/v1"


def test_private_upstream_accepted_when_setting_allows(owner, allow_private):
    assert upstream_url_check("http://127.0.0.1:9100/") == "http://127.0.0.1:9100"
    provider = custom_provider(owner.account, base_url="http://localhost:9100/v1")
    assert provider.base_url == "http://localhost:9100/v1"


# Custom providers


def test_custom_provider_create_encrypts_key_and_cleans_input(owner, public_dns):
    provider = custom_provider(
        owner.account,
        name=" Groq ",
        model_names=[" llama-3.3-70b ", "mixtral", "llama-3.3-70b", "llama3:8b"],
        created_by=owner.user,
    )

    stored = CustomProvider.objects.get(pk=provider.pk)
    assert stored.name == "groq"
    assert stored.base_url == f"https://{PUBLIC_HOST}/v1"
    assert stored.api_format == "openai"
    assert stored.model_names == ["llama-3.3-70b", "mixtral", "llama3:8b"]
    assert stored.key_last_four == "wxyz"
    assert stored.key_set_at is not None
    assert stored.created_by == owner.user
    assert CUSTOM_KEY not in row_text(CustomProvider, provider.pk)
    assert secret_decrypt(stored.encrypted_key) == CUSTOM_KEY


def test_custom_provider_without_key(owner, public_dns):
    provider = custom_provider(owner.account, api_key=None)
    assert (provider.encrypted_key, provider.key_last_four, provider.key_set_at) == ("", "", None)
    assert account_provider_config(account_id=owner.account.pk).custom["groq"].api_key == ""


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"name": "openai"}, "name", "The name `openai` is reserved"),
        ({"name": "Anthropic"}, "name", "The name `anthropic` is reserved"),
        ({"name": "has:colon"}, "name", "name must be 1 to 40 lowercase letters"),
        ({"name": "9lives"}, "name", "name must be 1 to 40 lowercase letters"),
        ({"name": "x" * 41}, "name", "name must be 1 to 40 lowercase letters"),
        ({"name": ""}, "name", "name is required."),
        ({"api_format": "cohere"}, "api_format", "api_format must be one of openai, anthropic."),
        ({"model_names": ["two words"]}, "models", "Each model name must be 1 to 120"),
        ({"model_names": "llama"}, "models", "models must be a list of model names."),
        ({"model_names": [f"m{i}" for i in range(201)]}, "models", "models may list at most"),
        ({"api_key": "short"}, "api_key", "api_key must be 8 to 4096"),
        ({"base_url": "http://127.0.0.1:9100/v1"}, "base_url", "The host `127.0.0.1` resolves"),
    ],
)
def test_custom_provider_create_rejects_bad_input(owner, public_dns, overrides, field, message):
    with pytest.raises(ProviderError) as caught:
        custom_provider(owner.account, **overrides)
    assert caught.value.field == field
    assert str(caught.value).startswith(message)
    assert not CustomProvider.objects.exists()


def test_custom_provider_names_are_unique_per_account(owner, outsider, public_dns):
    custom_provider(owner.account)
    with pytest.raises(ProviderError) as caught:
        custom_provider(owner.account, base_url=f"https://{PUBLIC_HOST}/other")
    assert str(caught.value) == "A custom provider named `groq` already exists."
    # Another account may use the same name.
    custom_provider(outsider.account)
    assert CustomProvider.objects.filter(name="groq").count() == 2


def test_custom_provider_update_replaces_and_clears_key(owner, public_dns, committed):
    provider = committed(custom_provider, account=owner.account)
    assert account_provider_config(account_id=owner.account.pk).custom["groq"].api_key == (
        CUSTOM_KEY
    )

    updated = committed(
        custom_provider_update,
        provider=provider,
        api_key="replacement-key-0000abcd",
        model_names=["m1"],
    )
    assert secret_decrypt(updated.encrypted_key) == "replacement-key-0000abcd"
    assert updated.key_last_four == "abcd"
    config = account_provider_config(account_id=owner.account.pk).custom["groq"]
    assert (config.api_key, config.model_names) == ("replacement-key-0000abcd", ("m1",))

    cleared = committed(custom_provider_update, provider=provider, key_clear=True)
    stored = CustomProvider.objects.get(pk=provider.pk)
    assert (stored.encrypted_key, stored.key_last_four, stored.key_set_at) == ("", "", None)
    assert cleared.model_names == ["m1"]
    assert account_provider_config(account_id=owner.account.pk).custom["groq"].api_key == ""


def test_custom_provider_update_checks_the_base_url_again(owner, allow_private, settings):
    provider = custom_provider(owner.account, base_url="http://127.0.0.1:9100/v1")
    settings.GATEWAY_ALLOW_PRIVATE_UPSTREAMS = False

    with pytest.raises(UpstreamAddressError):
        custom_provider_update(provider=provider, model_names=["other"])

    stored = CustomProvider.objects.get(pk=provider.pk)
    assert stored.model_names == ["llama-3.3-70b", "mixtral"]


def test_custom_provider_rename_and_delete(owner, public_dns, committed):
    provider = committed(custom_provider, account=owner.account)
    committed(custom_provider, account=owner.account, name="other")
    assert set(account_provider_config(account_id=owner.account.pk).custom) == {"groq", "other"}
    with pytest.raises(ProviderError) as caught:
        custom_provider_update(provider=provider, name="other")
    assert str(caught.value) == "A custom provider named `other` already exists."

    committed(custom_provider_update, provider=provider, name="fast")
    assert set(account_provider_config(account_id=owner.account.pk).custom) == {"fast", "other"}

    committed(custom_provider_delete, provider=provider)
    assert list(CustomProvider.objects.values_list("name", flat=True)) == ["other"]
    assert set(account_provider_config(account_id=owner.account.pk).custom) == {"other"}


# REST API: own keys


def test_api_own_key_is_write_only(owner):
    api = owner.api()

    response = api.put("/api/providers/keys/openai", {"api_key": OPENAI_KEY}, format="json")

    assert response.status_code == 200
    credential = ProviderCredential.objects.get(account=owner.account)
    expected = {
        "provider": "openai",
        "last_four": "1234",
        "set_at": timestamp(credential.set_at),
        "created_at": timestamp(credential.created_at),
    }
    assert response.json() == expected
    assert OPENAI_KEY not in response.content.decode()
    assert api.get("/api/providers/keys").json() == [expected]
    detail = api.get("/api/providers/keys/openai")
    assert detail.json() == expected
    assert OPENAI_KEY not in detail.content.decode()


def test_api_own_key_replace_and_delete(owner):
    api = owner.api()
    api.put("/api/providers/keys/anthropic", {"api_key": OPENAI_KEY}, format="json")

    replaced = api.put("/api/providers/keys/anthropic", {"api_key": OPENAI_KEY_2}, format="json")
    assert replaced.status_code == 200
    assert replaced.json()["last_four"] == "5678"
    assert ProviderCredential.objects.count() == 1

    deleted = api.delete("/api/providers/keys/anthropic")
    assert deleted.status_code == 204
    assert not ProviderCredential.objects.exists()
    missing = api.get("/api/providers/keys/anthropic")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {"code": "not_found", "message": "Not found.", "fields": {}}
    }


@pytest.mark.parametrize(
    ("path", "payload", "status", "fields"),
    [
        ("/api/providers/keys/openai", {}, 400, {"api_key": ["This field is required."]}),
        (
            "/api/providers/keys/openai",
            {"api_key": ""},
            400,
            {"api_key": ["This field may not be blank."]},
        ),
        (
            "/api/providers/keys/openai",
            {"api_key": "short"},
            400,
            {"api_key": ["api_key must be 8 to 4096 printable ASCII characters without spaces."]},
        ),
        ("/api/providers/keys/mistral", {"api_key": OPENAI_KEY}, 404, {}),
    ],
)
def test_api_own_key_rejects_bad_input(owner, path, payload, status, fields):
    response = owner.api().put(path, payload, format="json")
    assert response.status_code == status
    assert response.json()["error"]["fields"] == fields
    assert not ProviderCredential.objects.exists()


def test_api_needs_management_scope(owner):
    inference_only = access_key_create(account=owner.account, name="gw", scopes=["inference"])
    client = owner.api()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {inference_only.raw_key}")

    response = client.put("/api/providers/keys/openai", {"api_key": OPENAI_KEY}, format="json")

    assert response.status_code == 403
    assert not ProviderCredential.objects.exists()


def test_api_frozen_account_cannot_change_providers(owner):
    owner.account.is_frozen = True
    owner.account.save(update_fields=["is_frozen"])

    response = owner.api().put(
        "/api/providers/keys/openai", {"api_key": OPENAI_KEY}, format="json"
    )

    assert response.status_code == 403
    assert not ProviderCredential.objects.exists()


# REST API: custom providers


def custom_payload(**overrides) -> dict:
    payload = {
        "name": "groq",
        "base_url": f"https://{PUBLIC_HOST}/v1",
        "api_format": "openai",
        "api_key": CUSTOM_KEY,
        "models": ["llama-3.3-70b"],
    }
    return {**payload, **overrides}


def test_api_custom_provider_lifecycle(owner, public_dns):
    api = owner.api()

    created = api.post("/api/providers/custom", custom_payload(), format="json")

    assert created.status_code == 201
    provider = CustomProvider.objects.get()
    expected = {
        "id": provider.pk,
        "name": "groq",
        "base_url": f"https://{PUBLIC_HOST}/v1",
        "api_format": "openai",
        "models": ["llama-3.3-70b"],
        "has_key": True,
        "key_last_four": "wxyz",
        "key_set_at": timestamp(provider.key_set_at),
        "created_at": timestamp(provider.created_at),
        "updated_at": timestamp(provider.updated_at),
    }
    assert created.json() == expected
    assert CUSTOM_KEY not in created.content.decode()
    assert api.get("/api/providers/custom").json() == [expected]
    assert api.get(f"/api/providers/custom/{provider.pk}").json() == expected

    patched = api.patch(
        f"/api/providers/custom/{provider.pk}",
        {"models": ["a", "b"], "api_key": "new-custom-key-0000qrst"},
        format="json",
    )
    assert patched.status_code == 200
    assert patched.json()["models"] == ["a", "b"]
    assert patched.json()["key_last_four"] == "qrst"
    assert "new-custom-key" not in patched.content.decode()
    assert secret_decrypt(CustomProvider.objects.get().encrypted_key) == "new-custom-key-0000qrst"

    cleared = api.patch(f"/api/providers/custom/{provider.pk}", {"api_key": None}, format="json")
    assert cleared.status_code == 200
    body = cleared.json()
    assert (body["has_key"], body["key_last_four"], body["key_set_at"]) == (False, None, None)

    deleted = api.delete(f"/api/providers/custom/{provider.pk}")
    assert deleted.status_code == 204
    assert not CustomProvider.objects.exists()


def test_api_custom_provider_private_url_is_rejected(owner, settings):
    settings.GATEWAY_ALLOW_PRIVATE_UPSTREAMS = False
    response = owner.api().post(
        "/api/providers/custom",
        custom_payload(base_url="http://169.254.169.254/latest"),
        format="json",
    )

    assert response.status_code == 400
    message = (
        "The host `169.254.169.254` resolves to a private, loopback, link-local or otherwise "
        "non-public address. Custom providers must be reachable on the public internet "
        "unless the operator allows private upstreams."
    )
    assert response.json() == {
        "error": {
            "code": "invalid",
            "message": f"base_url: {message}",
            "fields": {"base_url": [message]},
        }
    }
    assert not CustomProvider.objects.exists()


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (custom_payload(name="openai"), "name"),
        (custom_payload(api_format="gemini"), "api_format"),
        (custom_payload(models="llama"), "models"),
        (custom_payload(models=["a b"]), "models"),
        (custom_payload(base_url="ftp://x"), "base_url"),
        ({"name": "groq"}, "base_url"),
    ],
)
def test_api_custom_provider_rejects_bad_input(owner, public_dns, payload, field):
    response = owner.api().post("/api/providers/custom", payload, format="json")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
    assert not CustomProvider.objects.exists()


def test_api_custom_provider_duplicate_name_is_400(owner, public_dns):
    owner.api().post("/api/providers/custom", custom_payload(), format="json")
    response = owner.api().post("/api/providers/custom", custom_payload(), format="json")
    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {
        "name": ["A custom provider named `groq` already exists."]
    }
    assert CustomProvider.objects.count() == 1


def test_outsider_gets_404_on_every_provider_endpoint(owner, outsider, public_dns):
    provider_credential_set(account=owner.account, provider="openai", api_key=OPENAI_KEY)
    provider = custom_provider(owner.account)
    before = (
        row_text(ProviderCredential, ProviderCredential.objects.get().pk),
        row_text(CustomProvider, provider.pk),
    )
    api = outsider.api()
    detail = f"/api/providers/custom/{provider.pk}"

    responses = [
        api.get("/api/providers/keys/openai"),
        api.delete("/api/providers/keys/openai"),
        api.get(detail),
        api.patch(detail, {"base_url": "http://127.0.0.1/v1", "api_key": None}, format="json"),
        api.delete(detail),
    ]

    assert [response.status_code for response in responses] == [404] * 5
    assert all(response.json()["error"]["code"] == "not_found" for response in responses)
    assert api.get("/api/providers/keys").json() == []
    assert api.get("/api/providers/custom").json() == []
    after = (
        row_text(ProviderCredential, ProviderCredential.objects.get().pk),
        row_text(CustomProvider, provider.pk),
    )
    assert after == before


# Dashboard


@pytest.fixture
def owner_client(owner) -> Client:
    client = Client()
    client.force_login(owner.user)
    return client


@pytest.fixture
def outsider_client(outsider) -> Client:
    client = Client()
    client.force_login(outsider.user)
    return client


def test_dashboard_sets_own_key_and_never_shows_it(owner, owner_client):
    response = owner_client.post(
        reverse("provider-key-set", args=["openai"]), {"openai-api_key": OPENAI_KEY}
    )

    assert response.status_code == 303
    assert response["location"] == reverse("providers")
    page = owner_client.get(reverse("providers"))
    html = page.content.decode()
    assert page.status_code == 200
    assert OPENAI_KEY not in html
    assert "…1234" in html
    assert "Saved the OpenAI key ending in 1234." in html
    assert 'href="/providers/" aria-current="page"' in html
    assert secret_decrypt(ProviderCredential.objects.get().encrypted_key) == OPENAI_KEY


def test_dashboard_rejects_bad_own_key(owner, owner_client):
    response = owner_client.post(
        reverse("provider-key-set", args=["anthropic"]), {"anthropic-api_key": "short"}
    )
    html = response.content.decode()
    assert response.status_code == 200
    assert "api_key must be 8 to 4096 printable ASCII characters without spaces." in html
    # The password field never renders what was typed.
    assert 'value="short"' not in html
    assert not ProviderCredential.objects.exists()


def test_dashboard_deletes_own_key(owner, owner_client):
    provider_credential_set(account=owner.account, provider="openai", api_key=OPENAI_KEY)
    response = owner_client.post(reverse("provider-key-delete", args=["openai"]))
    assert response.status_code == 303
    assert not ProviderCredential.objects.exists()


def test_dashboard_custom_provider_create_edit_delete(owner, owner_client, public_dns):
    created = owner_client.post(
        reverse("custom-provider-create"),
        {
            "name": "groq",
            "base_url": f"https://{PUBLIC_HOST}/v1",
            "api_format": "openai",
            "api_key": CUSTOM_KEY,
            "models": "llama-3.3-70b, mixtral\nqwen",
        },
    )
    assert created.status_code == 303
    provider = CustomProvider.objects.get()
    assert provider.model_names == ["llama-3.3-70b", "mixtral", "qwen"]
    page = owner_client.get(reverse("providers")).content.decode()
    assert "…wxyz" in page
    assert CUSTOM_KEY not in page

    edit_page = owner_client.get(reverse("custom-provider-edit", args=[provider.pk]))
    assert edit_page.status_code == 200
    assert CUSTOM_KEY not in edit_page.content.decode()
    edited = owner_client.post(
        reverse("custom-provider-edit", args=[provider.pk]),
        {
            "name": "groq",
            "base_url": f"https://{PUBLIC_HOST}/openai/v1",
            "api_format": "openai",
            "api_key": "",
            "models": "qwen",
            "key_clear": "",
        },
    )
    assert edited.status_code == 303
    provider.refresh_from_db()
    assert provider.base_url == f"https://{PUBLIC_HOST}/openai/v1"
    assert provider.model_names == ["qwen"]
    # A blank key field keeps the stored key.
    assert secret_decrypt(provider.encrypted_key) == CUSTOM_KEY

    deleted = owner_client.post(reverse("custom-provider-delete", args=[provider.pk]))
    assert deleted.status_code == 303
    assert not CustomProvider.objects.exists()


def test_dashboard_rejects_private_base_url(owner, owner_client, settings):
    settings.GATEWAY_ALLOW_PRIVATE_UPSTREAMS = False
    response = owner_client.post(
        reverse("custom-provider-create"),
        {"name": "local", "base_url": "http://10.0.0.8/v1", "api_format": "openai"},
    )
    assert response.status_code == 200
    assert "The host `10.0.0.8` resolves to a private" in response.content.decode()
    assert not CustomProvider.objects.exists()


def test_dashboard_outsider_gets_404_and_nothing_changes(owner, outsider_client, public_dns):
    provider_credential_set(account=owner.account, provider="openai", api_key=OPENAI_KEY)
    provider = custom_provider(owner.account)
    before = row_text(CustomProvider, provider.pk)

    responses = [
        outsider_client.post(reverse("provider-key-delete", args=["openai"])),
        outsider_client.get(reverse("custom-provider-edit", args=[provider.pk])),
        outsider_client.post(
            reverse("custom-provider-edit", args=[provider.pk]),
            {"name": "x", "base_url": f"https://{PUBLIC_HOST}/v1", "api_format": "openai"},
        ),
        outsider_client.post(reverse("custom-provider-delete", args=[provider.pk])),
    ]

    assert [response.status_code for response in responses] == [404] * 4
    assert ProviderCredential.objects.filter(account=owner.account).count() == 1
    assert row_text(CustomProvider, provider.pk) == before
    page = outsider_client.get(reverse("providers")).content.decode()
    assert "No custom providers yet." in page
    assert PUBLIC_HOST not in page
    assert "…1234" not in page


def test_admin_never_shows_secrets(owner, public_dns, admin_client):
    credential = provider_credential_set(
        account=owner.account, provider="openai", api_key=OPENAI_KEY
    )
    provider = custom_provider(owner.account)

    pages = [
        admin_client.get(reverse("admin:gateway_providercredential_changelist")),
        admin_client.get(reverse("admin:gateway_providercredential_change", args=[credential.pk])),
        admin_client.get(reverse("admin:gateway_customprovider_changelist")),
        admin_client.get(reverse("admin:gateway_customprovider_change", args=[provider.pk])),
    ]

    for page in pages:
        assert page.status_code == 200
        html = page.content.decode()
        for secret in (OPENAI_KEY, CUSTOM_KEY, credential.encrypted_key, provider.encrypted_key):
            assert secret not in html


# The price list


def test_price_list_fee_and_prices(owner, model_prices):
    response = owner.api().get("/api/prices")

    assert response.status_code == 200
    body = response.json()
    assert body["fee_usd_per_mtok"] == "0.05"
    by_id = {price["id"]: price for price in body["models"]}
    assert by_id["openai:gpt-4o-mini"] == {
        "id": "openai:gpt-4o-mini",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input_usd_per_mtok": "0.15",
        "output_usd_per_mtok": "0.60",
        "cache_read_usd_per_mtok": "0.075",
        "cache_write_usd_per_mtok": "0.00",
        "effective_from": "2025-01-01T00:00:00Z",
    }
    assert by_id["anthropic:claude-haiku-4-5"]["cache_write_usd_per_mtok"] == "1.25"
    assert [price["id"] for price in body["models"]] == sorted(by_id)


def test_price_list_scheduled_price(owner, model_prices, committed):
    starts = timezone.now() + timedelta(days=1)
    ModelPrice.objects.create(
        provider="openai",
        model="gpt-4o-mini",
        input_nanousd_per_mtok=200_000_000,
        output_nanousd_per_mtok=800_000_000,
        effective_from=starts,
    )
    committed(price_catalog_evict_on_commit)

    def gpt_4o_mini_input() -> str:
        prices = owner.api().get("/api/prices").json()["models"]
        return next(p for p in prices if p["id"] == "openai:gpt-4o-mini")["input_usd_per_mtok"]

    assert gpt_4o_mini_input() == "0.15"
    with time_machine.travel(starts + timedelta(seconds=1), tick=False):
        assert gpt_4o_mini_input() == "0.20"


def test_price_list_needs_a_key(db):
    response = APIClient().get("/api/prices")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
