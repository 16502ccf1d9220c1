from datetime import datetime

from django.conf import settings
from django.db import models
from django.db.models.functions import Coalesce
from django.utils import timezone

from accounts.models import Account


class AccessKeyQuerySet(models.QuerySet["AccessKey"]):
    def for_account(self, account: Account) -> "AccessKeyQuerySet":
        return self.filter(account=account)

    def usable(self, *, at: datetime) -> "AccessKeyQuerySet":
        return self.filter(revoked_at__isnull=True).exclude(expires_at__lte=at)


class AccessKey(models.Model):
    """A key that calls the gateway (`inference` scope) or the REST API (`management`).

    Only a SHA-256 hash of the key is stored; the key itself is shown once.
    """

    class Scope(models.TextChoices):
        INFERENCE = "inference", "Inference (gateway)"
        MANAGEMENT = "management", "Management (REST API)"

    class SpendLimitPeriod(models.TextChoices):
        DAILY = "daily", "Daily"
        WEEKLY = "weekly", "Weekly"
        MONTHLY = "monthly", "Monthly"
        NEVER = "never", "Never resets"

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="access_keys")
    name = models.CharField(max_length=120)
    # "tb_" and the first eight characters of the secret part; safe to show and log.
    prefix = models.CharField(max_length=16, db_index=True)
    last_four = models.CharField(max_length=4)
    key_hash = models.CharField(max_length=64, unique=True)
    scopes = models.JSONField(default=list)
    allowed_providers = models.JSONField(default=list, blank=True)
    allowed_models = models.JSONField(default=list, blank=True)
    spend_limit_nanousd = models.BigIntegerField(null=True, blank=True)
    spend_limit_period = models.CharField(
        max_length=16, choices=SpendLimitPeriod.choices, default=SpendLimitPeriod.NEVER
    )
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    objects = AccessKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.display})"

    @property
    def display(self) -> str:
        return f"{self.prefix}…{self.last_four}"

    def is_usable(self, *, at: datetime) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or at < self.expires_at


class ModelPrice(models.Model):
    """List price of a built-in model, per million tokens, from `effective_from` on.

    Prices are nano-dollars per million tokens: USD 2.50 per million is 2,500,000,000.
    """

    class Provider(models.TextChoices):
        OPENAI = "openai", "OpenAI"
        ANTHROPIC = "anthropic", "Anthropic"

    provider = models.CharField(max_length=32, choices=Provider.choices)
    model = models.CharField(max_length=120)
    input_nanousd_per_mtok = models.BigIntegerField()
    output_nanousd_per_mtok = models.BigIntegerField()
    cache_read_nanousd_per_mtok = models.BigIntegerField(default=0)
    cache_write_nanousd_per_mtok = models.BigIntegerField(default=0)
    effective_from = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["provider", "model", "-effective_from"]
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "model", "effective_from"], name="model_price_unique_start"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.provider}:{self.model} from {self.effective_from:%Y-%m-%d}"


class UsageRecord(models.Model):
    """One upstream attempt of a gateway request, with its tokens and what it cost.

    `input_tokens` excludes cached input, which is counted in `cache_read_tokens` and
    `cache_write_tokens`; `reasoning_tokens` is the part of `output_tokens` spent reasoning.
    """

    class KeySource(models.TextChoices):
        BUILTIN = "builtin", "Built-in inference"
        OWN = "own", "Account's own key"
        CUSTOM = "custom", "Custom provider"

    class Status(models.TextChoices):
        SUCCEEDED = "succeeded", "Succeeded"
        ABORTED = "aborted", "Aborted by the client"
        UPSTREAM_ERROR = "upstream_error", "Upstream error"
        FAILED = "failed", "Failed"

    request_id = models.CharField(max_length=64)
    attempt = models.PositiveSmallIntegerField(default=1)
    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="usage_records")
    access_key = models.ForeignKey(
        AccessKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage_records"
    )
    provider = models.CharField(max_length=64)
    model = models.CharField(max_length=120)
    surface = models.CharField(max_length=32)
    key_source = models.CharField(max_length=16, choices=KeySource.choices)
    status = models.CharField(max_length=16, choices=Status.choices)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    streamed = models.BooleanField(default=False)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cache_read_tokens = models.PositiveIntegerField(default=0)
    cache_write_tokens = models.PositiveIntegerField(default=0)
    reasoning_tokens = models.PositiveIntegerField(default=0)
    usage_estimated = models.BooleanField(default=False)
    fee_nanousd = models.BigIntegerField(default=0)
    model_cost_nanousd = models.BigIntegerField(default=0)
    cost_nanousd = models.BigIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(default=0)
    error_type = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["request_id", "attempt"], name="usage_record_unique_attempt"
            ),
        ]
        indexes = [models.Index(fields=["account", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.request_id} #{self.attempt} {self.provider}:{self.model}"

    @property
    def total_tokens(self) -> int:
        return (
            self.input_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
            + self.output_tokens
        )


class ProviderCredentialQuerySet(models.QuerySet["ProviderCredential"]):
    def for_account(self, account: Account) -> "ProviderCredentialQuerySet":
        return self.filter(account=account)


class ProviderCredential(models.Model):
    """An account's own key for a built-in provider, encrypted at rest.

    While one is set, requests to that provider go out on it and are charged only the
    processing fee. The key is write-only: only its last four characters are shown.
    """

    account = models.ForeignKey(
        Account, on_delete=models.CASCADE, related_name="provider_credentials"
    )
    provider = models.CharField(max_length=32, choices=ModelPrice.Provider.choices)
    # A Fernet token made by gateway/crypto.py; the plaintext is never stored.
    encrypted_key = models.TextField()
    last_four = models.CharField(max_length=4)
    # When the current key was stored; replacing the key moves it.
    set_at = models.DateTimeField(default=timezone.now)
    set_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(default=timezone.now)

    objects = ProviderCredentialQuerySet.as_manager()

    class Meta:
        ordering = ["provider", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["account", "provider"], name="provider_credential_unique_provider"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.get_provider_display()} key {self.display}"

    @property
    def display(self) -> str:
        return f"…{self.last_four}"


class CustomProviderQuerySet(models.QuerySet["CustomProvider"]):
    def for_account(self, account: Account) -> "CustomProviderQuerySet":
        return self.filter(account=account)


class CustomProvider(models.Model):
    """An upstream an account adds itself, called as `name:model`, charged only the fee.

    `base_url` follows the SDK convention of its format: OpenAI-format providers get
    `<base_url>/chat/completions` (so the URL usually ends in `/v1`), Anthropic-format
    providers get `<base_url>/v1/messages`.
    """

    class ApiFormat(models.TextChoices):
        OPENAI = "openai", "OpenAI Chat Completions"
        ANTHROPIC = "anthropic", "Anthropic Messages"

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="custom_providers")
    name = models.SlugField(max_length=40)
    base_url = models.URLField(max_length=500)
    api_format = models.CharField(max_length=16, choices=ApiFormat.choices)
    # A Fernet token made by gateway/crypto.py, or empty for a provider without a key.
    encrypted_key = models.TextField(blank=True, default="")
    key_last_four = models.CharField(max_length=4, blank=True, default="")
    key_set_at = models.DateTimeField(null=True, blank=True)
    # Model names the provider serves; a bare name listed here routes to this provider.
    model_names = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )

    objects = CustomProviderQuerySet.as_manager()

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["account", "name"], name="custom_provider_unique_name"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.base_url})"

    @property
    def has_key(self) -> bool:
        return bool(self.encrypted_key)

    @property
    def key_display(self) -> str:
        return f"…{self.key_last_four}" if self.encrypted_key else ""


class UsageRollup(models.Model):
    """Usage records summed per UTC hour or day, account, key, provider and model.

    Written only by `gateway.rollups.usage_rollups_refresh`, which replaces a whole window
    at once, so the rows of a window always equal the sum of its usage records. Counts are
    of upstream attempts (usage records): a request that fell back counts once per attempt.
    """

    class Period(models.TextChoices):
        HOUR = "hour", "Hour"
        DAY = "day", "Day"

    period = models.CharField(max_length=8, choices=Period.choices)
    # Start of the window in UTC, aligned to the hour or to midnight; the window is
    # [window_start, window_start + 1 hour or day).
    window_start = models.DateTimeField()
    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="usage_rollups")
    # The product revokes keys and never deletes them. Deleting a key whose usage is
    # rolled up raises RestrictedError, so the history stays whole. Deleting the account
    # deletes both.
    access_key = models.ForeignKey(
        AccessKey, null=True, blank=True, on_delete=models.RESTRICT, related_name="+"
    )
    provider = models.CharField(max_length=64)
    model = models.CharField(max_length=120)
    request_count = models.PositiveBigIntegerField(default=0)
    succeeded_count = models.PositiveBigIntegerField(default=0)
    # Upstream errors and failures; aborted streams count as neither succeeded nor failed.
    failed_count = models.PositiveBigIntegerField(default=0)
    estimated_count = models.PositiveBigIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cache_read_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    reasoning_tokens = models.BigIntegerField(default=0)
    fee_nanousd = models.BigIntegerField(default=0)
    model_cost_nanousd = models.BigIntegerField(default=0)
    cost_nanousd = models.BigIntegerField(default=0)
    computed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-window_start", "provider", "model", "id"]
        constraints = [
            # NULL access_key is folded to 0 (never a real id) in an expression index, so
            # rows without a key are unique too. `nulls_distinct=False` would express the
            # same, but only PostgreSQL 15+ supports it and Django skips it on SQLite.
            models.UniqueConstraint(
                models.F("period"),
                models.F("window_start"),
                models.F("account"),
                Coalesce(models.F("access_key"), models.Value(0)),
                models.F("provider"),
                models.F("model"),
                name="usage_rollup_unique_group",
            ),
        ]
        indexes = [models.Index(fields=["account", "period", "window_start"])]

    def __str__(self) -> str:
        return f"{self.period} {self.window_start:%Y-%m-%d %H:%M} {self.provider}:{self.model}"
