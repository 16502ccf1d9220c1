"""Operator commands: each prints what it did, and bad input raises CommandError."""

from datetime import UTC, datetime
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from accounts.models import Account, Membership, User
from credits.models import CreditLot
from credits.services import account_balance
from gateway.models import AccessKey
from gateway.services import access_key_authenticate, access_key_hash


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.mark.django_db
def test_create_account_makes_owner_and_account():
    out, _ = run("create_account", "--email", "ops@example.com", "--name", "Ops team")

    account = Account.objects.get(slug="ops-team")
    assert out.strip() == "Created account ops-team owned by ops@example.com"
    assert account.name == "Ops team"
    membership = Membership.objects.get(account=account)
    assert (membership.user.email, membership.role) == ("ops@example.com", "owner")
    assert membership.user.has_usable_password() is False


@pytest.mark.django_db
def test_create_account_twice_is_rejected():
    run("create_account", "--email", "ops@example.com", "--name", "Ops team")
    with pytest.raises(CommandError, match="already exists"):
        run("create_account", "--email", "ops@example.com", "--name", "Ops team")
    assert Account.objects.count() == 1


@pytest.mark.django_db
def test_create_account_rejects_bad_email():
    with pytest.raises(CommandError, match="not a valid email"):
        run("create_account", "--email", "not-an-email", "--name", "X")
    assert User.objects.count() == 0


@pytest.mark.django_db
def test_create_account_with_password_can_sign_in(client):
    run("create_account", "--email", "a@example.com", "--name", "A", "--password", "s3cret-pass!")
    assert client.login(email="a@example.com", password="s3cret-pass!") is True


def test_create_access_key_prints_it_once(owner):
    out, err = run("create_access_key", "--account", "acme", "--name", "CI")

    raw_key = out.strip()
    assert raw_key.startswith("tb_")
    stored = AccessKey.objects.get(name="CI")
    assert stored.key_hash == access_key_hash(raw_key)
    assert stored.scopes == ["inference", "management"]
    assert raw_key not in err
    assert access_key_authenticate(raw_key=raw_key).account_id == owner.account.pk


def test_create_access_key_for_unknown_account_fails(owner):
    with pytest.raises(CommandError, match="No account has the slug 'nope'"):
        run("create_access_key", "--account", "nope", "--name", "CI")
    assert AccessKey.objects.filter(name="CI").count() == 0


def test_grant_credits_adds_exact_amount(owner):
    out, _ = run(
        "grant_credits", "--account", "acme", "--amount-usd", "10.000000001", "--reason", "Pilot"
    )

    lot = CreditLot.objects.get(account=owner.account)
    assert lot.original_nanousd == 10_000_000_001
    assert lot.reason == "Pilot"
    assert out.startswith("Granted USD 10.000000001 to acme")
    assert account_balance(account_id=owner.account.pk).balance_nanousd == 10_000_000_001


@pytest.mark.parametrize(
    ("amount", "message"),
    [("ten", "not a USD amount"), ("-1", "positive"), ("0.0000000001", "nine decimal")],
)
def test_grant_credits_rejects_bad_amounts(owner, amount, message):
    with pytest.raises(CommandError, match=message):
        run("grant_credits", "--account", "acme", "--amount-usd", amount, "--reason", "x")
    assert CreditLot.objects.count() == 0


def test_check_ledger_passes_and_fails(funded):
    out, _ = run("check_ledger")
    assert out.strip() == "Ledger sound: 1 account checked"

    CreditLot.objects.filter(account=funded.account).update(remaining_nanousd=5)
    with pytest.raises(CommandError, match="1 ledger violations in 1 accounts"):
        run("check_ledger")


def test_configure_stripe_webhook_needs_secret(db, settings):
    settings.STRIPE_WEBHOOK_SECRET = ""
    with pytest.raises(CommandError, match="STRIPE_WEBHOOK_SECRET is not set"):
        run("configure_stripe_webhook")


def test_configure_stripe_webhook_prints_stable_url(db, settings):
    settings.STRIPE_WEBHOOK_SECRET = "whsec_commandtest"
    settings.PUBLIC_URL = "https://tollbooth.example.com"
    settings.STRIPE_WEBHOOK_UUID = "00000000-0000-4000-8000-00000000abcd"

    first, _ = run("configure_stripe_webhook")
    second, _ = run("configure_stripe_webhook")

    expected = "https://tollbooth.example.com/stripe/webhook/00000000-0000-4000-8000-00000000abcd/"
    assert first.strip() == expected
    assert second.strip() == expected


def test_seed_demo_runs_once(db):
    key, _ = run("seed_demo")
    again, err = run("seed_demo")

    assert key.strip().startswith("tb_")
    assert again == ""
    assert "already seeded" in err
    demo = Account.objects.get(slug="demo")
    assert account_balance(account_id=demo.pk).balance_nanousd == 1_000_000_000


def test_grant_credits_with_an_expiry(owner):
    out, _ = run(
        "grant_credits",
        "--account",
        "acme",
        "--amount-usd",
        "0.25",
        "--reason",
        "Short trial",
        "--expires-at",
        "2099-06-30T23:59:59Z",
    )

    lot = CreditLot.objects.get(account=owner.account)
    assert lot.expires_at == datetime(2099, 6, 30, 23, 59, 59, tzinfo=UTC)
    assert out.strip().endswith(f"(lot {lot.pk}, expires 2099-06-30 23:59:59 UTC)")


@pytest.mark.parametrize(
    ("expires_at", "message"),
    [
        ("next week", "is not an ISO 8601 time with a time zone"),
        ("2099-06-30T23:59:59", "is not an ISO 8601 time with a time zone"),
        ("2001-01-01T00:00:00Z", "A grant's expiry must be in the future."),
    ],
)
def test_grant_credits_rejects_bad_expiry(owner, expires_at, message):
    with pytest.raises(CommandError, match=message):
        run(
            "grant_credits",
            "--account",
            "acme",
            "--amount-usd",
            "1",
            "--reason",
            "x",
            "--expires-at",
            expires_at,
        )
    assert CreditLot.objects.count() == 0
