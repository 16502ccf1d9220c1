"""Browser dashboard views, driven through Django's test client as a signed-in user.

`owner` and `outsider` come from tests/conftest.py: two accounts, each with one user
and one access key.
"""

import re
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
import stripe
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.models import User
from credits.models import CheckoutPurchase, CreditLot
from credits.money import nanousd_from_cents
from credits.services import credit_grant
from gateway.models import AccessKey, UsageRecord
from gateway.services import access_key_hash

RAW_KEY_PATTERN = re.compile(r"tb_[A-Za-z0-9_\-]{20,}")


# Fixtures


@pytest.fixture(autouse=True)
def _stripe_unreachable() -> Iterator[None]:
    """Point the Stripe client at a closed loopback port, so no test can reach api.stripe.com."""
    previous = stripe.api_base
    stripe.api_base = "http://127.0.0.1:9"
    yield
    stripe.api_base = previous


@pytest.fixture
def stripe_calls(monkeypatch) -> list[str]:
    """Record every Checkout Session call instead of sending it."""
    calls: list[str] = []

    def record_create(*args, **kwargs):
        calls.append("create")
        raise AssertionError("checkout.Session.create must not be called")

    def record_retrieve(*args, **kwargs):
        calls.append("retrieve")
        raise AssertionError("checkout.Session.retrieve must not be called")

    monkeypatch.setattr(stripe.checkout.Session, "create", record_create)
    monkeypatch.setattr(stripe.checkout.Session, "retrieve", record_retrieve)
    return calls


@pytest.fixture
def stripe_server() -> Iterator[str]:
    """Start the local Stripe wire server and point the Stripe client at it."""
    from devtools.stripe_server import run_in_thread

    base_url, stop = run_in_thread(port=0)
    previous = stripe.api_base
    stripe.api_base = base_url
    yield base_url
    stripe.api_base = previous
    stop()


@pytest.fixture
def owner_client(owner) -> Client:
    client = Client()
    client.force_login(owner.user)
    return client


def _usage_record(account, *, request_id: str, cost_nanousd: int, **fields) -> UsageRecord:
    values = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "surface": "openai",
        "key_source": UsageRecord.KeySource.BUILTIN,
        "status": UsageRecord.Status.SUCCEEDED,
        "input_tokens": 1200,
        "output_tokens": 345,
        "cost_nanousd": cost_nanousd,
        **fields,
    }
    return UsageRecord.objects.create(account=account, request_id=request_id, **values)


def _start_checkout(client: Client, amount: str = "5.00") -> CheckoutPurchase:
    response = client.post(reverse("credits-checkout"), {"amount": amount})
    assert response.status_code == 303, response.content.decode()[:500]
    return CheckoutPurchase.objects.get()


# Sign-in and tenant scoping


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/"),
        ("get", "/credits/"),
        ("get", "/credits/success/?session_id=cs_test_1"),
        ("get", "/keys/"),
        ("get", "/usage/"),
        ("post", "/credits/checkout/"),
        ("post", "/keys/create/"),
        ("post", "/keys/1/revoke/"),
    ],
)
def test_pages_redirect_anonymous_to_login(db, method, url):
    response = getattr(Client(), method)(url)

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("account_login") + "?next=")


def test_user_without_account_gets_404(db):
    user = User.objects.create_user(email="loner@example.com", password="x")
    client = Client()
    client.force_login(user)

    assert client.get("/").status_code == 404


def test_url_names_resolve_to_paths():
    assert reverse("dashboard") == "/"
    assert reverse("credits") == "/credits/"
    assert reverse("credits-checkout") == "/credits/checkout/"
    assert reverse("credits-success") == "/credits/success/"
    assert reverse("keys") == "/keys/"
    assert reverse("key-create") == "/keys/create/"
    assert reverse("key-revoke", args=[7]) == "/keys/7/revoke/"
    assert reverse("usage") == "/usage/"


# Dashboard


def test_dashboard_shows_exact_balance(owner, owner_client):
    credit_grant(account=owner.account, amount_nanousd=4_999_950_000, reason="test")

    page = owner_client.get("/").content.decode()

    assert 'data-testid="balance">$4.99995<' in page
    # The lot table shows the exact remaining amount with all nine places.
    assert "$4.999950000" in page
    assert owner.account.name in page


def test_dashboard_shows_debt(owner, owner_client):
    owner.account.debt_nanousd = 1_500_000_000
    owner.account.save(update_fields=["debt_nanousd"])

    page = owner_client.get("/").content.decode()

    assert 'data-testid="balance">-$1.50<' in page
    assert "debt of <strong>$1.50</strong>" in page


def test_dashboard_lists_ten_recent_requests(owner, outsider, owner_client):
    start = timezone.now() - timedelta(hours=1)
    for number in range(12):
        _usage_record(
            owner.account,
            request_id=f"req-{number:02d}",
            cost_nanousd=1000 + number,
            model=f"model-{number:02d}",
            created_at=start + timedelta(minutes=number),
        )
    _usage_record(
        outsider.account, request_id="req-outsider", cost_nanousd=5, model="secret-model"
    )

    page = owner_client.get("/").content.decode()

    assert "openai:model-11" in page
    assert "openai:model-02" in page
    assert "openai:model-01" not in page
    assert "secret-model" not in page
    assert "$0.000001011" in page
    assert "1545" in page


def test_dashboard_quick_start_uses_public_url(owner_client, settings):
    settings.PUBLIC_URL = "https://gateway.example.test"

    page = owner_client.get("/").content.decode()

    assert "curl https://gateway.example.test/v1/chat/completions" in page
    assert 'base_url="https://gateway.example.test/v1"' in page


def test_layout_has_navigation_and_sign_out(owner_client):
    page = owner_client.get("/").content.decode()

    for href in [
        'href="/"',
        'href="/credits/"',
        'href="/keys/"',
        'href="/usage/"',
        'href="/api/docs"',
    ]:
        assert href in page
    assert f'action="{reverse("account_logout")}"' in page
    assert "htmx" in page


def test_login_page_uses_site_layout(db):
    page = Client().get(reverse("account_login")).content.decode()

    assert "css/tollbooth.css" in page
    assert 'name="login"' in page


# Buying credits


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("4.99", "The minimum purchase is $5.00."),
        ("0", "The minimum purchase is $5.00."),
        ("-10", "The minimum purchase is $5.00."),
        ("abc", "Enter an amount in dollars, such as 10.00."),
        ("NaN", "Enter an amount in dollars, such as 10.00."),
        ("5.001", "Enter at most two decimal places, such as 10.00."),
        ("", "This field is required."),
    ],
)
def test_buy_form_rejects_invalid_amount(owner_client, stripe_calls, amount, message):
    response = owner_client.post(reverse("credits-checkout"), {"amount": amount})

    assert response.status_code == 200
    assert message in response.content.decode()
    assert stripe_calls == []
    assert not CheckoutPurchase.objects.exists()


def test_buy_form_rejects_above_maximum(owner_client, stripe_calls, settings):
    settings.CREDITS_MAX_PURCHASE_CENTS = 10_000

    response = owner_client.post(reverse("credits-checkout"), {"amount": "100.01"})

    assert "The maximum purchase is $100.00." in response.content.decode()
    assert stripe_calls == []
    assert not CheckoutPurchase.objects.exists()


def test_buy_form_shows_service_error_for_frozen_account(owner, owner_client, stripe_calls):
    owner.account.is_frozen = True
    owner.account.save(update_fields=["is_frozen"])

    response = owner_client.post(reverse("credits-checkout"), {"amount": "5.00"})

    assert "This account is frozen" in response.content.decode()
    assert stripe_calls == []
    assert not CheckoutPurchase.objects.exists()


def test_buy_form_redirects_to_stripe(owner, owner_client, stripe_server, settings):
    settings.PUBLIC_URL = "http://127.0.0.1:8000"

    response = owner_client.post(reverse("credits-checkout"), {"amount": "$12.34"})

    assert response.status_code == 303
    assert response["Location"].startswith(stripe_server)
    purchase = CheckoutPurchase.objects.get()
    assert purchase.account == owner.account
    assert purchase.amount_cents == 1234
    assert purchase.created_by == owner.user


def test_credits_page_lists_transactions(owner, owner_client):
    credit_grant(account=owner.account, amount_nanousd=nanousd_from_cents(750), reason="welcome")

    page = owner_client.get(reverse("credits")).content.decode()

    assert "Promotional grant" in page
    assert "welcome" in page
    assert "$7.50" in page
    assert "$7.500000000" in page


# Stripe return page


def test_success_page_credits_paid_session(owner, owner_client, stripe_server):
    purchase = _start_checkout(owner_client, "5.00")
    success_url = f"{reverse('credits-success')}?session_id={purchase.stripe_session_id}"

    unpaid = owner_client.get(success_url).content.decode()
    assert "Payment is processing" in unpaid
    assert not CreditLot.objects.exists()

    paid = httpx.post(f"{stripe_server}/_test/sessions/{purchase.stripe_session_id}/pay")
    assert paid.is_success
    page = owner_client.get(success_url).content.decode()

    assert "Payment received: $5.00 added" in page
    assert 'data-testid="balance">$5.00<' in owner_client.get("/").content.decode()

    owner_client.get(success_url)
    assert CreditLot.objects.filter(account=owner.account).count() == 1


def test_success_page_for_other_accounts_session_is_404(owner_client, outsider, stripe_calls):
    CheckoutPurchase.objects.create(
        account=outsider.account, stripe_session_id="cs_test_outsider", amount_cents=500
    )

    response = owner_client.get(f"{reverse('credits-success')}?session_id=cs_test_outsider")

    assert response.status_code == 404
    assert stripe_calls == []
    assert not CreditLot.objects.exists()
    assert CheckoutPurchase.objects.get().status == CheckoutPurchase.Status.OPEN


@pytest.mark.parametrize("query", ["", "?session_id=", "?session_id=cs_test_unknown"])
def test_success_page_without_known_session_is_404(owner_client, stripe_calls, query):
    response = owner_client.get(reverse("credits-success") + query)

    assert response.status_code == 404
    assert stripe_calls == []


# Access keys


def test_key_create_shows_raw_key_once(owner, owner_client):
    response = owner_client.post(
        reverse("key-create"), {"name": "laptop", "scopes": ["inference", "management"]}
    )

    assert response.status_code == 201
    page = response.content.decode()
    raw_keys = set(RAW_KEY_PATTERN.findall(page))
    assert len(raw_keys) == 1
    raw_key = raw_keys.pop()
    assert "will not be shown again" in page
    assert "no-store" in response["Cache-Control"]

    stored = AccessKey.objects.get(name="laptop")
    assert stored.account == owner.account
    assert stored.key_hash == access_key_hash(raw_key)
    assert stored.scopes == ["inference", "management"]
    assert raw_key not in repr(AccessKey.objects.filter(pk=stored.pk).values().get())
    assert raw_key not in str(dict(owner_client.session))

    listing = owner_client.get(reverse("keys")).content.decode()
    assert raw_key not in listing
    assert stored.display in listing


def test_key_create_form_sent_twice_makes_one_key(owner, owner_client):
    page = owner_client.get(reverse("keys"))
    token = page.context["form"].initial["form_token"]
    data = {"name": "laptop", "scopes": ["inference"], "form_token": token}

    first = owner_client.post(reverse("key-create"), data)
    again = owner_client.post(reverse("key-create"), data)

    assert first.status_code == 201
    assert again.status_code == 303
    assert again["Location"] == reverse("keys")
    assert AccessKey.objects.filter(account=owner.account, name="laptop").count() == 1
    follow = owner_client.get(reverse("keys"))
    assert "already submitted" in follow.content.decode()


def test_key_create_defaults_to_inference_scope(owner_client):
    form_page = owner_client.get(reverse("keys")).content.decode()
    assert re.search(r'value="inference"[^>]*checked', form_page)
    assert not re.search(r'value="management"[^>]*checked', form_page)


def test_key_create_sets_expiry_to_end_of_day(owner_client):
    expires_on = timezone.localdate() + timedelta(days=3)

    owner_client.post(
        reverse("key-create"),
        {"name": "ci", "scopes": ["inference"], "expires_on": expires_on.isoformat()},
    )

    stored = AccessKey.objects.get(name="ci")
    assert timezone.localtime(stored.expires_at).date() == expires_on + timedelta(days=1)
    assert timezone.localtime(stored.expires_at).hour == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "", "scopes": ["inference"]}, "This field is required."),
        ({"name": "no scope"}, "Choose at least one scope."),
        ({"name": "odd", "scopes": ["admin"]}, "Select a valid choice."),
        (
            {"name": "old", "scopes": ["inference"], "expires_on": "2000-01-01"},
            "Choose today or a later date.",
        ),
    ],
)
def test_key_create_rejects_invalid_input(owner, owner_client, data, message):
    response = owner_client.post(reverse("key-create"), data)

    assert response.status_code == 200
    assert message in response.content.decode()
    assert AccessKey.objects.for_account(owner.account).count() == 1


def test_keys_page_lists_only_own_keys(owner, outsider, owner_client):
    page = owner_client.get(reverse("keys")).content.decode()

    assert owner.key.access_key.display in page
    assert outsider.key.access_key.display not in page


def test_key_revoke_revokes_own_key(owner, owner_client):
    key_id = owner.key.access_key.pk

    response = owner_client.post(reverse("key-revoke", args=[key_id]))

    assert response.status_code == 303
    assert response["Location"] == reverse("keys")
    assert AccessKey.objects.get(pk=key_id).revoked_at is not None
    assert "Revoked the key" in owner_client.get(reverse("keys")).content.decode()


def test_key_revoke_with_htmx_returns_row(owner, owner_client):
    key_id = owner.key.access_key.pk

    response = owner_client.post(reverse("key-revoke", args=[key_id]), HTTP_HX_REQUEST="true")

    assert response.status_code == 200
    row = response.content.decode()
    assert row.strip().startswith(f'<tr id="key-{key_id}">')
    assert "Revoked" in row


def test_key_revoke_of_other_accounts_key_is_404(owner_client, outsider):
    key_id = outsider.key.access_key.pk

    response = owner_client.post(reverse("key-revoke", args=[key_id]))

    assert response.status_code == 404
    assert AccessKey.objects.get(pk=key_id).revoked_at is None


def test_key_revoke_rejects_get(owner, owner_client):
    response = owner_client.get(reverse("key-revoke", args=[owner.key.access_key.pk]))

    assert response.status_code == 405
    assert AccessKey.objects.get(pk=owner.key.access_key.pk).revoked_at is None


# Usage


def test_usage_page_paginates_fifty_per_page(owner, outsider, owner_client):
    start = timezone.now() - timedelta(hours=2)
    for number in range(51):
        _usage_record(
            owner.account,
            request_id=f"req-{number:03d}",
            cost_nanousd=10,
            model=f"m-{number:03d}",
            created_at=start + timedelta(minutes=number),
        )
    _usage_record(outsider.account, request_id="req-outsider", cost_nanousd=5, model="secret")

    first = owner_client.get(reverse("usage")).content.decode()
    second = owner_client.get(reverse("usage") + "?page=2").content.decode()

    assert first.count("openai:m-") == 50
    assert "openai:m-050" in first
    assert "openai:m-000" not in first
    assert "Page 1 of 2" in first
    assert second.count("openai:m-") == 1
    assert "openai:m-000" in second
    assert "secret" not in first + second
