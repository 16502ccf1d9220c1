"""Shared fixtures: an owner, a member and an outsider, each with what they own.

Tests run against the PostgreSQL and Redis that `make test` points them at
(DATABASE_URL and REDIS_URL).
"""

import importlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import stripe
from django.apps import apps as django_apps
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from rest_framework.test import APIClient

from accounts.models import Account, Membership, User
from credits.money import nanousd_from_cents
from credits.services import credit_grant
from devtools import stripe_server, upstream
from gateway import services as gateway_services
from gateway.models import AccessKey
from gateway.services import CreatedAccessKey, access_key_create
from tests.factories import MembershipFactory, UserFactory


@pytest.fixture(autouse=True)
def _clear_cache():
    cache.clear()
    gateway_services._local_identities.clear()
    yield
    cache.clear()
    gateway_services._local_identities.clear()


@dataclass
class Tenant:
    user: User
    account: Account
    key: CreatedAccessKey

    def api(self) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.key.raw_key}")
        return client


def make_tenant(name: str) -> Tenant:
    membership = MembershipFactory(account__name=name, account__slug=name)
    key = access_key_create(
        account=membership.account,
        name=f"{name} key",
        scopes=[AccessKey.Scope.INFERENCE, AccessKey.Scope.MANAGEMENT],
    )
    return Tenant(user=membership.user, account=membership.account, key=key)


@pytest.fixture
def owner(db) -> Tenant:
    return make_tenant("acme")


@pytest.fixture
def member(owner: Tenant) -> User:
    user = UserFactory()
    Membership.objects.create(account=owner.account, user=user, role=Membership.Role.MEMBER)
    return user


@pytest.fixture
def outsider(db) -> Tenant:
    return make_tenant("outsider")


@pytest.fixture
def funded(owner: Tenant) -> Tenant:
    """The owner's account with a USD 10.00 promotional lot."""
    credit_grant(account=owner.account, amount_nanousd=nanousd_from_cents(1000), reason="test")
    return owner


@pytest.fixture
def model_prices(db):
    """Seed the price table again: transactional tests flush what the migration seeded."""
    seed_migration = importlib.import_module("gateway.migrations.0002_seed_model_prices")
    seed_migration.seed(django_apps, None)


@pytest.fixture(scope="session")
def upstream_url() -> Iterator[str]:
    """A local server speaking the OpenAI and Anthropic wire formats."""
    base_url, stop = upstream.run_in_thread(port=0)
    yield base_url
    stop()


@pytest.fixture(scope="session")
def stripe_url() -> Iterator[str]:
    """A local server speaking Stripe's wire format; stripe-python is pointed at it."""
    base_url, stop = stripe_server.run_in_thread(port=0)
    previous = stripe.api_base
    stripe.api_base = base_url
    yield base_url
    stripe.api_base = previous
    stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture(scope="session")
def server(django_db_setup, django_db_blocker, upstream_url, stripe_url, tmp_path_factory):
    """The real ASGI server (uvicorn) in its own process, on the test database."""
    database = connection.settings_dict
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    var_dir = tmp_path_factory.mktemp("server")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "DATABASE_URL": (
            f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
        ),
        "REDIS_URL": settings.TEST_REDIS_URL,
        "TOLLBOOTH_VAR_DIR": str(var_dir),
        "TOLLBOOTH_PUBLIC_URL": url,
        "OPENAI_BASE_URL": f"{upstream_url}/v1",
        "OPENAI_API_KEY": "upstream-openai-key",
        "ANTHROPIC_BASE_URL": upstream_url,
        "ANTHROPIC_API_KEY": "upstream-anthropic-key",
        "STRIPE_API_HOST": stripe_url,
        "STRIPE_SECRET_KEY": settings.STRIPE_SECRET_KEY,
        "CELERY_TASK_ALWAYS_EAGER": "1",
    }
    log_path = var_dir / "server.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "portal.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
            ],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The server exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/api/schema", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        process.terminate()
        raise RuntimeError(f"The server did not start:\n{log_path.read_text()}")
    yield ServerProcess(url=url, log_path=log_path)
    process.terminate()
    process.wait(timeout=10)
