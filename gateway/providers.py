"""Providers an account configures: its own OpenAI and Anthropic keys, and custom upstreams.

Keys are encrypted at rest (gateway/crypto.py) and write-only: after they are stored,
only their last four characters and when they were set are shown.

The gateway reads an account's configuration through `account_provider_config`. It keeps
the configuration, decrypted keys included, in this process's memory only, never in the
shared cache, for up to `GATEWAY_AUTH_CACHE_SECONDS`. Every read compares a version token
in the shared cache, so a change made through any process reaches all of them at once.
"""

import ipaddress
import logging
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import Account, User
from gateway.crypto import SecretDecryptError, secret_decrypt, secret_encrypt, secret_reencrypt
from gateway.models import CustomProvider, ModelPrice, ProviderCredential

logger = logging.getLogger(__name__)

BUILTIN_PROVIDER_NAMES = tuple(ModelPrice.Provider.values)
# Names a custom provider may not take: `openai:` and `anthropic:` mean the built-in ones.
RESERVED_PROVIDER_NAMES = frozenset(BUILTIN_PROVIDER_NAMES)
PROVIDER_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,39}")
# Keys go into an HTTP header: printable ASCII without spaces.
API_KEY_PATTERN = re.compile(r"[\x21-\x7e]{8,4096}")
MODEL_NAME_PATTERN = re.compile(r"[\x21-\x7e]{1,120}")
MAX_MODEL_NAMES = 200
BASE_URL_MAX_LENGTH = 500

PROVIDER_CONFIG_VERSION_KEY = "gateway:provider-config-version:{account_id}"
# Process-local caches are dropped whole beyond this many accounts or hosts.
LOCAL_CACHE_MAX_ENTRIES = 10_000
# How long a request-time verdict on an upstream host's addresses is reused, in seconds.
UPSTREAM_ADDRESS_CACHE_SECONDS = 10.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


class ProviderError(Exception):
    """A provider operation was rejected; the message is safe to show, `field` names the input."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UpstreamAddressError(ProviderError):
    """An upstream URL points at a host that is not a public address, or does not resolve."""


# Upstream addresses


def host_addresses(host: str) -> list[IPAddress]:
    """Resolve a host name or a literal IP address to its addresses; raise UpstreamAddressError."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as error:
        raise UpstreamAddressError(
            f"The host `{host}` could not be resolved.", field="base_url"
        ) from error
    addresses: set[IPAddress] = set()
    for _family, _type, _proto, _canonname, sockaddr in infos:
        # An IPv6 address may carry a zone (`fe80::1%eth0`), which ip_address() rejects.
        addresses.add(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]))
    return sorted(addresses, key=lambda address: (address.version, int(address)))


def address_is_public(address: IPAddress) -> bool:
    """Return whether an address is globally routable unicast.

    IPv4 addresses embedded in IPv6 (mapped `::ffff:a.b.c.d` and NAT64 `64:ff9b::a.b.c.d`)
    are judged by the IPv4 address they reach.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address in NAT64_PREFIX:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.is_global and not address.is_multicast


def upstream_host_check(host: str) -> None:
    """Raise UpstreamAddressError unless every address of `host` is public.

    With `GATEWAY_ALLOW_PRIVATE_UPSTREAMS` set, any host passes without being resolved.
    """
    if settings.GATEWAY_ALLOW_PRIVATE_UPSTREAMS:
        return
    addresses = host_addresses(host)
    if not addresses or not all(address_is_public(address) for address in addresses):
        # The resolved addresses are not echoed: they may describe an internal network.
        raise UpstreamAddressError(
            f"The host `{host}` resolves to a private, loopback, link-local or otherwise "
            "non-public address. Custom providers must be reachable on the public internet "
            "unless the operator allows private upstreams.",
            field="base_url",
        )


_host_verdicts: dict[str, tuple[float, str | None]] = {}


def upstream_host_check_cached(host: str) -> None:
    """Check a host as `upstream_host_check` does, reusing a verdict for a few seconds.

    The gateway checks again at request time because DNS answers change after a provider
    was saved; the short reuse spares a lookup on every request.
    """
    if settings.GATEWAY_ALLOW_PRIVATE_UPSTREAMS:
        return
    now = time.monotonic()
    cached = _host_verdicts.get(host)
    if cached is None or cached[0] <= now:
        try:
            upstream_host_check(host)
            message = None
        except UpstreamAddressError as error:
            message = str(error)
        if len(_host_verdicts) >= LOCAL_CACHE_MAX_ENTRIES:
            _host_verdicts.clear()
        cached = (now + UPSTREAM_ADDRESS_CACHE_SECONDS, message)
        _host_verdicts[host] = cached
    if cached[1] is not None:
        raise UpstreamAddressError(cached[1], field="base_url")


def upstream_url_check(url: str) -> str:
    """Validate a custom provider's base URL and return it without a trailing slash.

    The URL must be http or https with a host and no user name, password, query or
    fragment, and the host must pass `upstream_host_check`.
    """
    if not isinstance(url, str) or not url.strip():
        raise ProviderError("base_url is required.", field="base_url")
    url = url.strip()
    if len(url) > BASE_URL_MAX_LENGTH:
        raise ProviderError(
            f"base_url must be at most {BASE_URL_MAX_LENGTH} characters.", field="base_url"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ProviderError("base_url is not a valid URL.", field="base_url") from error
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProviderError(
            "base_url must be an http or https URL with a host, such as "
            "https://api.example.com/v1.",
            field="base_url",
        )
    if parts.username is not None or parts.password is not None:
        raise ProviderError(
            "base_url must not contain a user name or password; set the key instead.",
            field="base_url",
        )
    if parts.query or parts.fragment:
        raise ProviderError("base_url must not have a query or a fragment.", field="base_url")
    if port == 0:
        raise ProviderError("base_url has an invalid port.", field="base_url")
    upstream_host_check(parts.hostname)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


# Validation


def _clean_api_key(api_key: object) -> str:
    if not isinstance(api_key, str) or not api_key.strip():
        raise ProviderError("api_key is required.", field="api_key")
    api_key = api_key.strip()
    if not API_KEY_PATTERN.fullmatch(api_key):
        raise ProviderError(
            "api_key must be 8 to 4096 printable ASCII characters without spaces.",
            field="api_key",
        )
    return api_key


def _clean_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ProviderError("name is required.", field="name")
    name = name.strip().lower()
    if not PROVIDER_NAME_PATTERN.fullmatch(name):
        raise ProviderError(
            "name must be 1 to 40 lowercase letters, digits, hyphens or underscores, "
            "starting with a letter; models are then called as `name:model`.",
            field="name",
        )
    if name in RESERVED_PROVIDER_NAMES:
        raise ProviderError(
            f"The name `{name}` is reserved for the built-in provider; choose another.",
            field="name",
        )
    return name


def _clean_api_format(api_format: object) -> str:
    if api_format not in CustomProvider.ApiFormat.values:
        raise ProviderError(
            f"api_format must be one of {', '.join(CustomProvider.ApiFormat.values)}.",
            field="api_format",
        )
    return str(api_format)


def _clean_model_names(model_names: object) -> list[str]:
    if not isinstance(model_names, list | tuple):
        raise ProviderError("models must be a list of model names.", field="models")
    cleaned: list[str] = []
    for model_name in model_names:
        if not isinstance(model_name, str):
            raise ProviderError("models must be a list of model names.", field="models")
        model_name = model_name.strip()
        if not MODEL_NAME_PATTERN.fullmatch(model_name):
            raise ProviderError(
                "Each model name must be 1 to 120 printable ASCII characters without spaces.",
                field="models",
            )
        if model_name not in cleaned:
            cleaned.append(model_name)
    if len(cleaned) > MAX_MODEL_NAMES:
        raise ProviderError(f"models may list at most {MAX_MODEL_NAMES} names.", field="models")
    return cleaned


# The account's own keys for the built-in providers


@transaction.atomic
def provider_credential_set(
    *, account: Account, provider: str, api_key: str, set_by: User | None = None
) -> ProviderCredential:
    """Store the account's own key for a built-in provider, replacing the one before."""
    if provider not in BUILTIN_PROVIDER_NAMES:
        raise ProviderError(
            f"provider must be one of {', '.join(BUILTIN_PROVIDER_NAMES)}.", field="provider"
        )
    api_key = _clean_api_key(api_key)
    now = timezone.now()
    values = {
        "encrypted_key": secret_encrypt(api_key),
        "last_four": api_key[-4:],
        "set_at": now,
        "set_by": set_by,
    }
    credential, created = ProviderCredential.objects.update_or_create(
        account=account,
        provider=provider,
        defaults=values,
        create_defaults={**values, "created_at": now},
    )
    provider_config_evict_on_commit(account_id=account.pk)
    logger.info(
        "%s own %s key %s for account %s",
        "Stored" if created else "Replaced",
        provider,
        credential.pk,
        account.pk,
    )
    return credential


@transaction.atomic
def provider_credential_delete(*, credential: ProviderCredential) -> None:
    """Delete the account's own key; requests to that provider go back to built-in inference."""
    account_id, provider, credential_id = (
        credential.account_id,
        credential.provider,
        credential.pk,
    )
    credential.delete()
    provider_config_evict_on_commit(account_id=account_id)
    logger.info("Deleted own %s key %s of account %s", provider, credential_id, account_id)


# Custom providers


def _name_taken(*, account_id: int, name: str, exclude_id: int | None = None) -> bool:
    matches = CustomProvider.objects.filter(account_id=account_id, name=name)
    if exclude_id is not None:
        matches = matches.exclude(pk=exclude_id)
    return matches.exists()


def _name_taken_error(name: str) -> ProviderError:
    return ProviderError(f"A custom provider named `{name}` already exists.", field="name")


@transaction.atomic
def custom_provider_create(
    *,
    account: Account,
    name: str,
    base_url: str,
    api_format: str,
    api_key: str | None = None,
    model_names: list[str] | None = None,
    created_by: User | None = None,
) -> CustomProvider:
    """Add a custom provider; its models are then called as `name:model`."""
    name = _clean_name(name)
    api_format = _clean_api_format(api_format)
    cleaned_models = _clean_model_names(model_names or [])
    cleaned_key = _clean_api_key(api_key) if api_key else ""
    base_url = upstream_url_check(base_url)
    if _name_taken(account_id=account.pk, name=name):
        raise _name_taken_error(name)

    now = timezone.now()
    try:
        with transaction.atomic():
            provider = CustomProvider.objects.create(
                account=account,
                name=name,
                base_url=base_url,
                api_format=api_format,
                encrypted_key=secret_encrypt(cleaned_key) if cleaned_key else "",
                key_last_four=cleaned_key[-4:],
                key_set_at=now if cleaned_key else None,
                model_names=cleaned_models,
                created_at=now,
                updated_at=now,
                created_by=created_by,
            )
    except IntegrityError as error:
        # A concurrent request took the name between the check and the insert.
        raise _name_taken_error(name) from error

    provider_config_evict_on_commit(account_id=account.pk)
    logger.info("Created custom provider %s for account %s", provider.pk, account.pk)
    return provider


@transaction.atomic
def custom_provider_update(
    *,
    provider: CustomProvider,
    name: str | None = None,
    base_url: str | None = None,
    api_format: str | None = None,
    model_names: list[str] | None = None,
    api_key: str | None = None,
    key_clear: bool = False,
) -> CustomProvider:
    """Change a custom provider; None leaves a field as it is.

    `api_key` replaces the key; `key_clear` removes it (the two exclude each other).
    The base URL is checked again even when unchanged, since its host may resolve
    elsewhere by now.
    """
    if api_key is not None and key_clear:
        raise ProviderError("Either set api_key or clear the key, not both.", field="api_key")
    provider = CustomProvider.objects.select_for_update().get(pk=provider.pk)
    update_fields = ["updated_at"]
    if name is not None:
        provider.name = _clean_name(name)
        if _name_taken(account_id=provider.account_id, name=provider.name, exclude_id=provider.pk):
            raise _name_taken_error(provider.name)
        update_fields.append("name")
    if api_format is not None:
        provider.api_format = _clean_api_format(api_format)
        update_fields.append("api_format")
    if model_names is not None:
        provider.model_names = _clean_model_names(model_names)
        update_fields.append("model_names")
    if api_key is not None:
        cleaned_key = _clean_api_key(api_key)
        provider.encrypted_key = secret_encrypt(cleaned_key)
        provider.key_last_four = cleaned_key[-4:]
        provider.key_set_at = timezone.now()
        update_fields += ["encrypted_key", "key_last_four", "key_set_at"]
    elif key_clear:
        provider.encrypted_key = ""
        provider.key_last_four = ""
        provider.key_set_at = None
        update_fields += ["encrypted_key", "key_last_four", "key_set_at"]
    provider.base_url = upstream_url_check(base_url if base_url is not None else provider.base_url)
    update_fields.append("base_url")
    provider.updated_at = timezone.now()
    try:
        with transaction.atomic():
            provider.save(update_fields=update_fields)
    except IntegrityError as error:
        raise _name_taken_error(provider.name) from error
    provider_config_evict_on_commit(account_id=provider.account_id)
    logger.info("Updated custom provider %s of account %s", provider.pk, provider.account_id)
    return provider


@transaction.atomic
def custom_provider_delete(*, provider: CustomProvider) -> None:
    """Delete a custom provider; its models stop routing at once."""
    account_id, provider_id = provider.account_id, provider.pk
    provider.delete()
    provider_config_evict_on_commit(account_id=account_id)
    logger.info("Deleted custom provider %s of account %s", provider_id, account_id)


def provider_secrets_reencrypt() -> int:
    """Encrypt every stored provider key again with the first configured key; return the count.

    Run after putting a new key first in `GATEWAY_ENCRYPTION_KEY`; the old keys can be
    dropped once this has finished. Each row is its own transaction.
    """
    count = 0
    for model in (ProviderCredential, CustomProvider):
        for row_id in model.objects.exclude(encrypted_key="").values_list("pk", flat=True):
            with transaction.atomic():
                row = model.objects.select_for_update().filter(pk=row_id).first()
                if row is None or not row.encrypted_key:
                    continue
                row.encrypted_key = secret_reencrypt(row.encrypted_key)
                row.save(update_fields=["encrypted_key"])
                provider_config_evict_on_commit(account_id=row.account_id)
            count += 1
    logger.info("Encrypted %s provider keys again", count)
    return count


# The configuration the gateway reads on every request


@dataclass(frozen=True)
class CustomProviderConfig:
    """A custom provider in the form the router uses, with its key decrypted."""

    provider_id: int
    name: str
    base_url: str
    api_format: str
    model_names: tuple[str, ...]
    created_at: datetime
    # "" for a provider without a key; None when the stored key cannot be decrypted.
    api_key: str | None = field(repr=False)


@dataclass(frozen=True)
class ProviderConfig:
    """An account's own keys (built-in provider name to decrypted key) and custom providers.

    An own key is None when it is stored but cannot be decrypted with the configured keys.
    """

    own_keys: dict[str, str | None] = field(repr=False)
    custom: dict[str, CustomProviderConfig]

    def custom_serving(self, model: str) -> list[CustomProviderConfig]:
        """Return the custom providers whose model list names `model`."""
        return [provider for provider in self.custom.values() if model in provider.model_names]


def _decrypted(token: str, *, row_kind: str, row_id: int) -> str | None:
    try:
        return secret_decrypt(token)
    except SecretDecryptError:
        logger.error("The stored key of %s %s cannot be decrypted", row_kind, row_id)
        return None


def provider_config_load(*, account_id: int) -> ProviderConfig:
    """Read an account's provider configuration from the database and decrypt its keys."""
    own_keys = {
        credential.provider: _decrypted(
            credential.encrypted_key, row_kind="own provider key", row_id=credential.pk
        )
        for credential in ProviderCredential.objects.filter(account_id=account_id).only(
            "pk", "provider", "encrypted_key"
        )
    }
    custom = {}
    for provider in CustomProvider.objects.filter(account_id=account_id).order_by("name"):
        api_key = (
            _decrypted(provider.encrypted_key, row_kind="custom provider", row_id=provider.pk)
            if provider.encrypted_key
            else ""
        )
        custom[provider.name] = CustomProviderConfig(
            provider_id=provider.pk,
            name=provider.name,
            base_url=provider.base_url.rstrip("/"),
            api_format=provider.api_format,
            model_names=tuple(provider.model_names),
            created_at=provider.created_at,
            api_key=api_key,
        )
    return ProviderConfig(own_keys=own_keys, custom=custom)


def version_token_new() -> int:
    """Return a new version token: an integer, which the cache stores as plain text, so the
    admission script in Redis can compare it."""
    return secrets.randbits(62)


def cache_version(key: str, known: object = None) -> int:
    """Return the version token stored under `key`, creating one if the cache has none.

    Pass `known` when the token was already read (for example with `cache.get_many`).
    """
    token = known if known is not None else cache.get(key)
    if isinstance(token, int):
        return token
    # Missing, or in an older format the admission script cannot compare.
    cache.add(key, version_token_new(), timeout=None)
    token = cache.get(key)
    if not isinstance(token, int):
        token = version_token_new()
        cache.set(key, token, timeout=None)
    # Another process may have added its token first; everyone uses the stored one.
    return token


def provider_config_version_key(account_id: int) -> str:
    return PROVIDER_CONFIG_VERSION_KEY.format(account_id=account_id)


# account id -> (version token, monotonic expiry, configuration); this process only.
_configs: dict[int, tuple[int, float, ProviderConfig]] = {}


def account_provider_config_local(*, account_id: int) -> tuple[int, ProviderConfig] | None:
    """Return the configuration in this process's memory with its version token, if fresh."""
    entry = _configs.get(account_id)
    if entry is None or entry[1] <= time.monotonic():
        return None
    return entry[0], entry[2]


def account_provider_config(*, account_id: int, version: int | None = None) -> ProviderConfig:
    """Return an account's provider configuration, from this process's memory when current.

    `version` is the token under `provider_config_version_key(account_id)` when the
    caller has read it already.
    """
    # The token is read before the database, so a change committed in between leaves a
    # stale entry under the old token, which the next read replaces.
    version = cache_version(provider_config_version_key(account_id), version)
    now = time.monotonic()
    entry = _configs.get(account_id)
    if entry is not None and entry[0] == version and entry[1] > now:
        return entry[2]
    config = provider_config_load(account_id=account_id)
    if len(_configs) >= LOCAL_CACHE_MAX_ENTRIES:
        _configs.clear()
    _configs[account_id] = (version, now + settings.GATEWAY_AUTH_CACHE_SECONDS, config)
    return config


def provider_config_evict_on_commit(*, account_id: int) -> None:
    """Make every process reload the account's provider configuration once this commits."""

    def evict() -> None:
        _configs.pop(account_id, None)
        cache.set(provider_config_version_key(account_id), version_token_new(), timeout=None)

    transaction.on_commit(evict)
