"""Encryption at rest for provider keys that accounts store in Tollbooth.

Secrets are Fernet tokens (AES-128-CBC with HMAC-SHA256, from the `cryptography`
package). `settings.GATEWAY_ENCRYPTION_KEY` holds one or more comma-separated Fernet
keys: the first one encrypts, every one of them decrypts. To rotate, put a new key first,
keep the old ones after it, run `provider_secrets_reencrypt()` from gateway/providers.py,
then drop the old keys.
"""

from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class SecretDecryptError(Exception):
    """A stored secret cannot be decrypted with any configured key."""


@lru_cache(maxsize=4)
def _multi_fernet(keys_setting: str) -> MultiFernet:
    # Cached per setting value, so tests that override the setting get their own keys.
    keys = [key.strip() for key in keys_setting.split(",") if key.strip()]
    if not keys:
        raise ImproperlyConfigured("GATEWAY_ENCRYPTION_KEY is empty.")
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except ValueError as error:
        # The message names no key material, only what is wrong with its shape.
        raise ImproperlyConfigured(
            "GATEWAY_ENCRYPTION_KEY must be comma-separated Fernet keys "
            "(32 bytes, URL-safe base64; make one with Fernet.generate_key())."
        ) from error


def _cipher() -> MultiFernet:
    return _multi_fernet(settings.GATEWAY_ENCRYPTION_KEY)


def secret_encrypt(plaintext: str) -> str:
    """Encrypt a secret with the first configured key; return the token as text."""
    return _cipher().encrypt(plaintext.encode()).decode("ascii")


def secret_decrypt(token: str) -> str:
    """Decrypt a token made by `secret_encrypt`; raise SecretDecryptError when no key fits."""
    try:
        return _cipher().decrypt(token.encode("ascii")).decode()
    except (InvalidToken, UnicodeError) as error:
        raise SecretDecryptError("The stored secret cannot be decrypted.") from error


def secret_reencrypt(token: str) -> str:
    """Return the token encrypted again with the first configured key (key rotation)."""
    try:
        return _cipher().rotate(token.encode("ascii")).decode("ascii")
    except (InvalidToken, UnicodeError) as error:
        raise SecretDecryptError("The stored secret cannot be decrypted.") from error
