"""Django settings for Tollbooth.

Every value that differs between a laptop and production comes from the environment;
the README lists each variable. With no environment set, Tollbooth runs on SQLite with
an embedded Celery broker, so `make run` works on a bare machine.
"""

import base64
import hashlib
import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from celery.schedules import crontab

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("TOLLBOOTH_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG and os.environ.get("TOLLBOOTH_REQUIRE_SECRET_KEY") == "1":
        raise RuntimeError("SECRET_KEY is missing; set it in the environment.")
    # NOTE: only for development and tests; production sets SECRET_KEY.
    SECRET_KEY = "insecure-development-key-set-SECRET_KEY-in-production"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")
PUBLIC_URL = os.environ.get("TOLLBOOTH_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "allauth",
    "accounts.apps.SignInConfig",
    "djstripe",
    "accounts",
    "credits",
    "gateway",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "allauth.account.middleware.AccountMiddleware",
]

ROOT_URLCONF = "portal.urls"
ASGI_APPLICATION = "portal.asgi.application"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "accounts.context_processors.current_account",
            ],
        },
    },
]

# https://github.com/jazzband/dj-database-url
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{VAR_DIR / 'tollbooth.sqlite3'}"),
        conn_max_age=int(os.environ.get("DATABASE_CONN_MAX_AGE", "60")),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # SQLite serialises writers; a busy timeout lets the worker and the server share it.
    DATABASES["default"]["OPTIONS"] = {"timeout": 20, "transaction_mode": "IMMEDIATE"}
    DATABASES["default"]["CONN_MAX_AGE"] = 0
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": os.environ.get("CACHE_KEY_PREFIX", "tollbooth"),
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "tollbooth",
        }
    }

AUTH_USER_MODEL = "accounts.User"
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "account_login"
LOGIN_REDIRECT_URL = "dashboard"

# https://docs.allauth.org/en/latest/account/configuration.html
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "password1*", "password2*"]
ACCOUNT_USER_MODEL_USERNAME_FIELD = None
ACCOUNT_EMAIL_VERIFICATION = os.environ.get("ACCOUNT_EMAIL_VERIFICATION", "optional")
ACCOUNT_ADAPTER = "accounts.adapter.AccountAdapter"
ACCOUNT_LOGOUT_ON_GET = False

EMAIL_BACKEND = os.environ.get(
    "EMAIL_BACKEND",
    "django.core.mail.backends.console.EmailBackend"
    if not os.environ.get("EMAIL_HOST")
    else "django.core.mail.backends.smtp.EmailBackend",
)
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "25"))
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "Tollbooth <noreply@localhost>")

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

# https://www.django-rest-framework.org/api-guide/settings/
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["gateway.authentication.AccessKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["gateway.authentication.HasManagementScope"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "portal.api.exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Tollbooth API",
    "DESCRIPTION": "Credits, access keys and usage. Money is in USD as decimal strings.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI from the installed drf-spectacular-sidecar package, not from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# Stripe and dj-stripe. https://dj-stripe.dev/dj-stripe/reference/settings/
STRIPE_SECRET_KEY = os.environ.get("STRIPE_SECRET_KEY", "sk_test_" + "0" * 24 + "tollboothdemo")
STRIPE_LIVE_MODE = STRIPE_SECRET_KEY.startswith("sk_live_")
STRIPE_TEST_SECRET_KEY = "" if STRIPE_LIVE_MODE else STRIPE_SECRET_KEY
STRIPE_LIVE_SECRET_KEY = STRIPE_SECRET_KEY if STRIPE_LIVE_MODE else ""
STRIPE_WEBHOOK_SECRET = os.environ.get("STRIPE_WEBHOOK_SECRET", "")
# Fixes the webhook URL path `/stripe/webhook/<uuid>/`; without it one is generated once.
STRIPE_WEBHOOK_UUID = os.environ.get("STRIPE_WEBHOOK_UUID", "")
if os.environ.get("STRIPE_API_HOST"):
    STRIPE_API_HOST = os.environ["STRIPE_API_HOST"]
DJSTRIPE_FOREIGN_KEY_TO_FIELD = "id"
DJSTRIPE_USE_NATIVE_JSONFIELD = True
DJSTRIPE_WEBHOOK_VALIDATION = "verify_signature"
SILENCED_SYSTEM_CHECKS = ["djstripe.I002", "djstripe.W007"]

# Credits: every amount is in integer nano-dollars (1e-9 USD).
CREDITS_MIN_PURCHASE_CENTS = 500
CREDITS_MAX_PURCHASE_CENTS = int(os.environ.get("CREDITS_MAX_PURCHASE_CENTS", "1000000"))
CREDITS_LOT_LIFETIME_YEARS = 1
# USD 0.05 per million tokens is 50 nano-dollars a token.
GATEWAY_FEE_NANOUSD_PER_MTOK = int(os.environ.get("GATEWAY_FEE_NANOUSD_PER_MTOK", "50000000"))

# Built-in inference on the operator's keys.
OPENAI_BASE_URL = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1").rstrip("/")
OPENAI_API_KEY = os.environ.get("OPENAI_API_KEY", "")
ANTHROPIC_BASE_URL = os.environ.get("ANTHROPIC_BASE_URL", "https://api.anthropic.com").rstrip("/")
ANTHROPIC_API_KEY = os.environ.get("ANTHROPIC_API_KEY", "")
GATEWAY_UPSTREAM_TIMEOUT_SECONDS = float(os.environ.get("GATEWAY_UPSTREAM_TIMEOUT_SECONDS", "600"))
GATEWAY_CONNECT_TIMEOUT_SECONDS = float(os.environ.get("GATEWAY_CONNECT_TIMEOUT_SECONDS", "10"))
# Whole (not streamed) responses are charged right after they are sent, off the
# latency path; off, the charge is written before the response leaves.
GATEWAY_METER_AFTER_RESPONSE = env_bool("GATEWAY_METER_AFTER_RESPONSE", True)
# Charges are written by a child process of the server (on another core) when the
# server runs the ASGI lifespan protocol, as uvicorn does, and REDIS_URL is set. Off, or
# without Redis, a thread of the server writes them.
GATEWAY_METERING_PROCESS = env_bool("GATEWAY_METERING_PROCESS", True)
# The metering process runs at this niceness (0 to 19) so that, when the cores are busy,
# requests are served first and charges wait. Holds keep the credit of requests whose
# charge is still queued from being spent twice. docs/benchmarks.md has the figures
# with and without it.
GATEWAY_METERING_NICENESS = int(os.environ.get("GATEWAY_METERING_NICENESS", "10"))
# Metering waits this long to gather a batch before writing it. Charges land that much
# later, and each batch costs one transaction instead of one per request.
GATEWAY_METER_BATCH_WINDOW_MS = int(os.environ.get("GATEWAY_METER_BATCH_WINDOW_MS", "20"))
# Access keys and balances are cached this long; revokes and ledger changes evict them.
GATEWAY_AUTH_CACHE_SECONDS = int(os.environ.get("GATEWAY_AUTH_CACHE_SECONDS", "60"))
# Reservations of a request's worst-case cost lapse after this long, so a process that
# dies mid-request cannot keep credit reserved. The default is the upstream timeout plus 60 s.
GATEWAY_RESERVATION_TTL_SECONDS = int(
    os.environ.get(
        "GATEWAY_RESERVATION_TTL_SECONDS", str(int(GATEWAY_UPSTREAM_TIMEOUT_SECONDS) + 60)
    )
)

# Provider keys that accounts store (their own OpenAI and Anthropic keys, custom provider
# keys) are encrypted with these comma-separated Fernet keys: the first encrypts, all
# decrypt, so a new key goes first during a rotation (see gateway/crypto.py).
GATEWAY_ENCRYPTION_KEY = os.environ.get("GATEWAY_ENCRYPTION_KEY", "")
if not GATEWAY_ENCRYPTION_KEY:
    # NOTE: development only: a stable key derived from SECRET_KEY, so stored provider keys
    # survive restarts. Production sets its own key; otherwise changing SECRET_KEY makes
    # every stored provider key unreadable.
    GATEWAY_ENCRYPTION_KEY = base64.urlsafe_b64encode(
        hashlib.sha256(b"tollbooth-provider-keys:" + SECRET_KEY.encode()).digest()
    ).decode()
# Custom providers must resolve to public addresses unless this is set (local models, tests).
GATEWAY_ALLOW_PRIVATE_UPSTREAMS = env_bool("GATEWAY_ALLOW_PRIVATE_UPSTREAMS", False)

# Celery. https://docs.celeryq.dev/en/stable/userguide/configuration.html
CELERY_BROKER_URL = os.environ.get(
    "CELERY_BROKER_URL", REDIS_URL or f"sqla+sqlite:///{VAR_DIR / 'celery-broker.sqlite3'}"
)
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "expire-credit-lots": {
        "task": "credits.tasks.credit_lots_expire_due",
        "schedule": timedelta(minutes=1),
    },
    "reconcile-checkout-sessions": {
        "task": "credits.tasks.checkout_sessions_reconcile",
        "schedule": timedelta(minutes=15),
    },
    "remind-expiring-credit-lots": {
        "task": "credits.tasks.credit_lot_expiry_reminders_queue",
        "schedule": timedelta(hours=1),
    },
    "check-low-balance-alerts": {
        "task": "credits.tasks.accounts_low_balance_check_all",
        "schedule": timedelta(hours=1),
    },
    # Rolls up usage of the hours and days that closed; see gateway/rollups.py.
    "roll-up-usage": {
        "task": "gateway.tasks.usage_rollups_refresh_due",
        "schedule": crontab(minute="*/5"),
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "stripe": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
    },
}
