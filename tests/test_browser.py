"""Drive the dashboard in headless Chromium against the app served by `live_server`.

Stripe is the local wire server from devtools/stripe_server.py, running in this process,
so the live server's Checkout calls and the browser's payment page both stay on 127.0.0.1.
"""

import os
import re
from collections.abc import Iterator

import pytest
import stripe

# Playwright's sync API keeps an asyncio loop in this thread, which makes Django's
# async-safety check reject the ORM calls that fixtures and assertions make.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

from accounts.models import User  # noqa: E402
from credits.models import CheckoutPurchase, CreditLot  # noqa: E402
from devtools.stripe_server import run_in_thread  # noqa: E402
from gateway.models import AccessKey  # noqa: E402
from gateway.services import access_key_hash  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM_PATH = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 15_000


@pytest.fixture
def stripe_base_url() -> Iterator[str]:
    """Start the local Stripe wire server and point the Stripe client at it."""
    base_url, stop = run_in_thread(port=0)
    previous = stripe.api_base
    stripe.api_base = base_url
    yield base_url
    stripe.api_base = previous
    stop()


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM_PATH):
        pytest.skip(f"Chromium is not installed at {CHROMIUM_PATH}.")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM_PATH, args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


def _sign_up(page: Page, base_url: str, email: str) -> None:
    page.goto(f"{base_url}/accounts/signup/")
    page.fill('input[name="email"]', email)
    page.fill('input[name="password1"]', "violet-harbour-73-lantern")
    page.fill('input[name="password2"]', "violet-harbour-73-lantern")
    page.get_by_role("button", name="Sign Up").click()
    page.wait_for_url(f"{base_url}/")


def test_signup_key_and_purchase(page: Page, live_server, settings, stripe_base_url):
    settings.PUBLIC_URL = live_server.url
    base_url = live_server.url

    # Sign up and land on an empty dashboard.
    _sign_up(page, base_url, "buyer@example.com")
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
    expect(page.get_by_test_id("balance")).to_have_text("$0.00")
    user = User.objects.get(email="buyer@example.com")
    assert user.accounts.count() == 1

    # Create a key: the secret is on the response page and nowhere after it.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Keys").click()
    page.fill('input[name="name"]', "browser key")
    page.get_by_role("button", name="Create key").click()
    raw_key = page.get_by_test_id("raw-key").input_value()
    assert re.fullmatch(r"tb_[A-Za-z0-9_\-]+", raw_key)
    expect(page.get_by_text("will not be shown again")).to_be_visible()
    stored = AccessKey.objects.get(name="browser key")
    assert stored.key_hash == access_key_hash(raw_key)
    assert stored.scopes == ["inference"]

    page.goto(f"{base_url}/keys/")
    assert raw_key not in page.content()
    expect(page.get_by_text(stored.display)).to_be_visible()

    # Buy USD 5.00 on the local Stripe payment page and come back to the success page.
    page.goto(f"{base_url}/")
    page.fill('input[name="amount"]', "5.00")
    page.get_by_role("button", name="Buy credits").click()
    page.wait_for_url(f"{stripe_base_url}/pay/**")
    page.locator("#pay-button").click()
    page.wait_for_url(f"{base_url}/credits/success/**")
    expect(page.get_by_role("heading", name="Payment received: $5.00 added")).to_be_visible()

    purchase = CheckoutPurchase.objects.get()
    assert purchase.status == CheckoutPurchase.Status.FULFILLED
    assert CreditLot.objects.filter(account=purchase.account).count() == 1

    page.get_by_role("link", name="Back to the dashboard").click()
    expect(page.get_by_test_id("balance")).to_have_text("$5.00")


def test_providers_page_lists_builtin_prices(page: Page, live_server, model_prices):
    base_url = live_server.url
    _sign_up(page, base_url, "pricing@example.com")

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Providers").click()

    table = page.get_by_test_id("price-table")
    expect(table.get_by_role("row").filter(has_text="openai:gpt-4o-mini")).to_have_text(
        re.compile(r"openai:gpt-4o-mini\s*0\.15\s*0\.60\s*0\.075\s*0\.00")
    )
    expect(page.get_by_text("processing fee of USD 0.05 per million tokens")).to_be_visible()


def test_buy_form_error_and_key_revoke(page: Page, live_server, settings, stripe_base_url):
    settings.PUBLIC_URL = live_server.url
    base_url = live_server.url
    _sign_up(page, base_url, "careful@example.com")

    # An amount below the minimum stays on our site with an error.
    page.fill('input[name="amount"]', "4.99")
    page.get_by_role("button", name="Buy credits").click()
    expect(page.get_by_text("The minimum purchase is $5.00.")).to_be_visible()
    assert page.url == f"{base_url}/credits/checkout/"
    assert not CheckoutPurchase.objects.exists()

    # Revoking through htmx swaps the row in place after the confirmation dialog.
    page.goto(f"{base_url}/keys/")
    page.fill('input[name="name"]', "short-lived")
    page.get_by_role("button", name="Create key").click()
    page.goto(f"{base_url}/keys/")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Revoke").click()
    expect(page.get_by_text("Revoked", exact=False)).to_be_visible()
    # The flash message appears only after the no-JavaScript redirect, so htmx did the swap.
    expect(page.get_by_text("Revoked the key")).to_have_count(0)
    assert page.url == f"{base_url}/keys/"
    assert AccessKey.objects.get(name="short-lived").revoked_at is not None
