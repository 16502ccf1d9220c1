"""Shared fixtures: an owner, a member and an outsider, each with what they own.

Tests run against the PostgreSQL and Redis that `make test` points them at
(DATABASE_URL and REDIS_URL).
"""

from dataclasses import dataclass

import pytest
from django.core.cache import cache
from rest_framework.test import APIClient

from accounts.models import Account, Membership, User
from credits.money import nanousd_from_cents
from credits.services import credit_grant
from gateway.models import AccessKey
from gateway.services import CreatedAccessKey, access_key_create
from tests.factories import MembershipFactory, UserFactory


@pytest.fixture(autouse=True)
def _clear_cache():
    cache.clear()
    yield
    cache.clear()


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

