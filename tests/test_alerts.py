"""Credit email alerts: low balance, lots about to expire, and the threshold setting."""

import smtplib
from datetime import UTC, datetime, timedelta

import pytest
from django.core.mail.backends.locmem import EmailBackend
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from accounts.models import Account, Membership
from credits import tasks
from credits.models import CreditLot
from credits.services import (
    CreditsError,
    account_low_balance_check,
    account_low_balance_threshold_set,
    alert_recipients,
    credit_grant,
    credit_lot_expire,
    credit_lot_expiry_extend,
    credit_lot_expiry_reminder_send,
    credit_lot_void,
    credit_lots_due_for_expiry_reminder,
    ledger_violations,
    usage_debit,
)
from tests.factories import UserFactory

USD = 1_000_000_000
NOT_USD = "Enter an amount in USD such as 10.00, with at most nine decimal places."
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def frozen_time(time_machine) -> datetime:
    time_machine.move_to(NOW, tick=False)
    return NOW


@pytest.fixture
def admin_user(owner):
    user = UserFactory(email="admin@example.com")
    Membership.objects.create(account=owner.account, user=user, role=Membership.Role.ADMIN)
    return user


@pytest.fixture
def team(owner, member, admin_user):
    """The owner's account with an owner, an admin, a member and an inactive admin."""
    owner.user.email = "owner@example.com"
    owner.user.save(update_fields=["email"])
    member.email = "member@example.com"
    member.save(update_fields=["email"])
    inactive = UserFactory(email="gone@example.com", is_active=False)
    Membership.objects.create(account=owner.account, user=inactive, role=Membership.Role.ADMIN)
    return owner


@pytest.fixture
def staff(db):
    return UserFactory(email="support@example.com", is_staff=True)


@pytest.fixture
def queued_checks(monkeypatch) -> list[int]:
    """Record each low-balance check queued, then run it as the worker would."""
    queued: list[int] = []
    task = tasks.account_low_balance_check

    def delay(account_id: int):
        queued.append(account_id)
        return task.apply(args=[account_id])

    monkeypatch.setattr(task, "delay", delay)
    return queued


def debit(account: Account, request_id: str, amount_nanousd: int, capture) -> None:
    """Charge a request and run what it queued on commit."""
    with capture(execute=True):
        usage_debit(account_id=account.pk, request_id=request_id, amount_nanousd=amount_nanousd)


def alerted_at(account: Account) -> datetime | None:
    account.refresh_from_db()
    return account.low_balance_alerted_at


LOW_BALANCE_BODY = """\
The credit balance of the Tollbooth account acme is now $4.499999999, below the alert \
threshold of $5.00.

When the balance reaches zero, the gateway rejects requests with HTTP 402 (Payment Required). \
Buy credits at:
http://127.0.0.1:8000/credits/

This email is sent once each time the balance drops below the threshold. Owners and \
admins can change or turn off the threshold on the credits page.
"""


# Recipients


def test_recipients_are_active_owners_and_admins(team, outsider):
    assert alert_recipients(account_id=team.account.pk) == [
        "admin@example.com",
        "owner@example.com",
    ]


# The low-balance alert


def test_low_balance_alert_once_per_drop(
    team, frozen_time, mailoutbox, django_capture_on_commit_callbacks, settings, queued_checks
):
    settings.PUBLIC_URL = "http://127.0.0.1:8000"
    account = team.account
    credit_grant(account=account, amount_nanousd=10 * USD, reason="start")
    account_low_balance_threshold_set(account=account, threshold_nanousd=5 * USD)

    debit(account, "req_1", 4 * USD, django_capture_on_commit_callbacks)
    assert mailoutbox == []
    assert queued_checks == []

    debit(account, "req_2", 1_500_000_001, django_capture_on_commit_callbacks)

    assert [message.to for message in mailoutbox] == [["admin@example.com"], ["owner@example.com"]]
    assert {message.subject for message in mailoutbox} == {"The balance of acme is below $5.00"}
    assert mailoutbox[0].body == LOW_BALANCE_BODY
    assert mailoutbox[0].from_email == settings.DEFAULT_FROM_EMAIL
    assert alerted_at(account) == frozen_time

    assert queued_checks == [account.pk]

    # Further charges below the threshold queue nothing and send nothing.
    debit(account, "req_3", USD, django_capture_on_commit_callbacks)
    assert queued_checks == [account.pk]
    assert len(mailoutbox) == 2

    # Back above the threshold re-arms the alert, without an email.
    with django_capture_on_commit_callbacks(execute=True):
        credit_grant(account=account, amount_nanousd=2 * USD, reason="top-up")
    assert alerted_at(account) is None
    assert len(mailoutbox) == 2
    assert queued_checks == [account.pk, account.pk]

    debit(account, "req_4", USD, django_capture_on_commit_callbacks)

    assert queued_checks == [account.pk, account.pk, account.pk]
    assert len(mailoutbox) == 4
    assert "is now $4.499999999, below" in mailoutbox[3].body
    account.refresh_from_db()
    assert ledger_violations(account=account) == []


def test_low_balance_alert_mentions_debt(team, frozen_time, mailoutbox, settings):
    account = team.account
    usage_debit(account_id=account.pk, request_id="req_over", amount_nanousd=2_500_000_000)
    Account.objects.filter(pk=account.pk).update(low_balance_threshold_nanousd=USD)

    assert account_low_balance_check(account_id=account.pk) is True

    assert "is now -$2.50, below the alert threshold of $1.00." in mailoutbox[0].body
    assert (
        "The account owes $2.50 from requests that cost more than the balance; "
        "the next purchase pays it first." in mailoutbox[0].body
    )


def test_debit_above_threshold_adds_no_query(owner, frozen_time):
    credit_grant(account=owner.account, amount_nanousd=10 * USD, reason="start")
    with CaptureQueriesContext(connection) as without_threshold:
        usage_debit(account_id=owner.account.pk, request_id="req_a", amount_nanousd=1000)
    account_low_balance_threshold_set(account=owner.account, threshold_nanousd=5 * USD)

    with CaptureQueriesContext(connection) as with_threshold:
        usage_debit(account_id=owner.account.pk, request_id="req_b", amount_nanousd=1000)

    assert len(with_threshold) == len(without_threshold)


def test_lot_expiry_below_threshold_alerts(
    team, frozen_time, mailoutbox, django_capture_on_commit_callbacks
):
    account = team.account
    lot = credit_grant(
        account=account,
        amount_nanousd=3 * USD,
        reason="short",
        at=frozen_time - timedelta(days=3),
        expires_at=frozen_time - timedelta(minutes=1),
    )
    credit_grant(account=account, amount_nanousd=USD, reason="long", at=frozen_time)
    Account.objects.filter(pk=account.pk).update(low_balance_threshold_nanousd=2 * USD)

    with django_capture_on_commit_callbacks(execute=True):
        credit_lot_expire(lot_id=lot.pk)

    assert [message.to for message in mailoutbox] == [["admin@example.com"], ["owner@example.com"]]
    assert "is now $1.00, below the alert threshold of $2.00." in mailoutbox[0].body


def test_threshold_above_balance_alerts_once(
    team, frozen_time, mailoutbox, django_capture_on_commit_callbacks
):
    credit_grant(account=team.account, amount_nanousd=USD, reason="start")

    with django_capture_on_commit_callbacks(execute=True):
        account_low_balance_threshold_set(account=team.account, threshold_nanousd=5 * USD)
    assert len(mailoutbox) == 2
    assert mailoutbox[0].subject == "The balance of acme is below $5.00"

    # Saving the same threshold again changes nothing.
    with django_capture_on_commit_callbacks(execute=True):
        account_low_balance_threshold_set(account=team.account, threshold_nanousd=5 * USD)
    assert len(mailoutbox) == 2
    assert alerted_at(team.account) == frozen_time

    # A new threshold is a new alert.
    with django_capture_on_commit_callbacks(execute=True):
        account_low_balance_threshold_set(account=team.account, threshold_nanousd=2 * USD)
    assert len(mailoutbox) == 4
    assert mailoutbox[3].subject == "The balance of acme is below $2.00"


def test_low_balance_check_is_idempotent(team, frozen_time, mailoutbox):
    Account.objects.filter(pk=team.account.pk).update(low_balance_threshold_nanousd=USD)

    assert tasks.account_low_balance_check(team.account.pk) is True
    assert tasks.account_low_balance_check(team.account.pk) is False

    assert len(mailoutbox) == 2


def test_no_threshold_sends_no_alert(
    team, frozen_time, mailoutbox, django_capture_on_commit_callbacks, queued_checks
):
    credit_grant(account=team.account, amount_nanousd=USD, reason="start")

    debit(team.account, "req_all", 2 * USD, django_capture_on_commit_callbacks)

    assert queued_checks == []
    assert account_low_balance_check(account_id=team.account.pk) is False
    assert mailoutbox == []
    assert alerted_at(team.account) is None


def test_low_balance_mail_failure_retried(team, frozen_time, mailoutbox, monkeypatch):
    Account.objects.filter(pk=team.account.pk).update(low_balance_threshold_nanousd=USD)

    def fail_to_send(self, messages):
        raise smtplib.SMTPServerDisconnected("gone")

    with monkeypatch.context() as patch:
        patch.setattr(EmailBackend, "send_messages", fail_to_send)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            account_low_balance_check(account_id=team.account.pk)
    assert alerted_at(team.account) is None

    assert tasks.accounts_low_balance_check_all() == 1

    assert len(mailoutbox) == 2
    assert alerted_at(team.account) == frozen_time


@pytest.mark.parametrize("threshold", [-1, USD * 1_000_000 + 1, True, 1.5, "5"])
def test_threshold_bad_values_change_nothing(owner, threshold):
    with pytest.raises(CreditsError, match="from USD 0 to USD 1,000,000"):
        account_low_balance_threshold_set(account=owner.account, threshold_nanousd=threshold)

    owner.account.refresh_from_db()
    assert owner.account.low_balance_threshold_nanousd is None


# Expiry reminders

LOT_EXPIRY_BODY = """\
$2.999999 of credits in the Tollbooth account acme are still unspent and expire on \
2026-06-08 12:00 UTC (lot {lot_id}, promotional grant).

Credits are spent soonest expiry first, so requests use these before any others. Whatever \
is left at the expiry is written off. See the balance and all lots at:
http://127.0.0.1:8000/credits/

This reminder is sent once for each expiry date of a lot.
"""


def test_expiry_reminder_week_ahead_once(team, outsider, staff, frozen_time, mailoutbox, settings):
    settings.PUBLIC_URL = "http://127.0.0.1:8000"
    account = team.account
    week = timedelta(days=7)
    past = frozen_time - timedelta(days=30)

    def grant(usd_nanos: int, expires_at: datetime, target: Account = account) -> CreditLot:
        return credit_grant(
            account=target,
            amount_nanousd=usd_nanos,
            reason="test",
            at=past,
            expires_at=expires_at,
            idempotency_key=f"grant-{target.pk}-{usd_nanos}-{expires_at.isoformat()}",
        )

    due = grant(3 * USD, frozen_time + week)
    usage_debit(account_id=account.pk, request_id="req_1", amount_nanousd=1000)
    grant(USD, frozen_time + week + timedelta(seconds=1))  # more than a week away
    spent = grant(500, frozen_time + timedelta(days=2))
    usage_debit(account_id=account.pk, request_id="req_2", amount_nanousd=500)
    voided = grant(2 * USD, frozen_time + timedelta(days=3))
    credit_lot_void(lot_id=voided.pk, reason="Fraud", actor=staff)
    grant(4 * USD, frozen_time - timedelta(seconds=1))  # already past its expiry
    theirs = grant(USD, frozen_time + timedelta(days=1), outsider.account)
    spent.refresh_from_db()
    assert spent.remaining_nanousd == 0

    assert credit_lots_due_for_expiry_reminder(at=frozen_time) == [theirs.pk, due.pk]
    assert tasks.credit_lot_expiry_reminders_queue() == 2

    ours = [message for message in mailoutbox if message.to != [outsider.user.email]]
    assert [message.to for message in ours] == [["admin@example.com"], ["owner@example.com"]]
    assert ours[0].subject == "$2.999999 of credits in acme expire on 2026-06-08"
    assert ours[0].body == LOT_EXPIRY_BODY.format(lot_id=due.pk)
    others = [message for message in mailoutbox if message.to == [outsider.user.email]]
    assert [message.subject for message in others] == [
        "$1.00 of credits in outsider expire on 2026-06-02"
    ]
    due.refresh_from_db()
    assert due.expiry_reminder_sent_at == frozen_time

    # A rerun, and a direct send, find nothing left to remind.
    assert tasks.credit_lot_expiry_reminders_queue() == 0
    assert credit_lot_expiry_reminder_send(lot_id=due.pk) is False
    assert len(mailoutbox) == 3


def test_extended_lot_reminded_again(team, staff, frozen_time, time_machine, mailoutbox):
    lot = credit_grant(
        account=team.account,
        amount_nanousd=USD,
        reason="trial",
        at=frozen_time - timedelta(days=30),
        expires_at=frozen_time + timedelta(days=2),
    )
    assert credit_lot_expiry_reminder_send(lot_id=lot.pk) is True
    new_expiry = frozen_time + timedelta(days=60)
    credit_lot_expiry_extend(lot_id=lot.pk, expires_at=new_expiry, reason="Asked", actor=staff)
    assert credit_lot_expiry_reminder_send(lot_id=lot.pk) is False

    time_machine.move_to(new_expiry - timedelta(days=7), tick=False)

    assert credit_lot_expiry_reminder_send(lot_id=lot.pk) is True
    assert len(mailoutbox) == 4
    assert mailoutbox[3].subject == f"$1.00 of credits in acme expire on {new_expiry:%Y-%m-%d}"


def test_expiry_reminder_failure_retried(team, frozen_time, mailoutbox, monkeypatch):
    lot = credit_grant(
        account=team.account,
        amount_nanousd=USD,
        reason="trial",
        at=frozen_time - timedelta(days=30),
        expires_at=frozen_time + timedelta(days=2),
    )

    def fail_to_send(self, messages):
        raise smtplib.SMTPServerDisconnected("gone")

    with monkeypatch.context() as patch:
        patch.setattr(EmailBackend, "send_messages", fail_to_send)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            credit_lot_expiry_reminder_send(lot_id=lot.pk)
    lot.refresh_from_db()
    assert lot.expiry_reminder_sent_at is None

    assert tasks.credit_lot_expiry_reminder_send(lot.pk) is True
    assert len(mailoutbox) == 2


# The threshold in the REST API


def balance_body(**changes) -> dict:
    return {
        "balance_usd": "10.000000000",
        "balance_nanousd": 10 * USD,
        "balance_cents": 1000,
        "debt_usd": "0.000000000",
        "debt_nanousd": 0,
        "low_balance_threshold_usd": None,
        "low_balance_threshold_nanousd": None,
        **changes,
    }


def without_lots(body: dict) -> dict:
    return {key: value for key, value in body.items() if key != "lots"}


def test_api_sets_and_clears_threshold(funded, outsider):
    response = funded.api().patch(
        "/api/credits/balance", {"low_balance_threshold_usd": "5.25"}, format="json"
    )

    assert response.status_code == 200
    assert without_lots(response.json()) == balance_body(
        low_balance_threshold_usd="5.250000000", low_balance_threshold_nanousd=5_250_000_000
    )
    assert len(response.json()["lots"]) == 1
    funded.account.refresh_from_db()
    assert funded.account.low_balance_threshold_nanousd == 5_250_000_000
    assert without_lots(funded.api().get("/api/credits/balance").json()) == balance_body(
        low_balance_threshold_usd="5.250000000", low_balance_threshold_nanousd=5_250_000_000
    )
    outsider.account.refresh_from_db()
    assert outsider.account.low_balance_threshold_nanousd is None

    response = funded.api().patch(
        "/api/credits/balance", {"low_balance_threshold_usd": None}, format="json"
    )

    assert response.status_code == 200
    assert without_lots(response.json()) == balance_body()
    funded.account.refresh_from_db()
    assert funded.account.low_balance_threshold_nanousd is None


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"low_balance_threshold_usd": "abc"}, NOT_USD),
        ({"low_balance_threshold_usd": "-1"}, NOT_USD),
        ({"low_balance_threshold_usd": "1e5"}, NOT_USD),
        ({"low_balance_threshold_usd": "0.0000000001"}, NOT_USD),
        (
            {"low_balance_threshold_usd": "1000000.01"},
            "The low-balance threshold must be from USD 0 to USD 1,000,000.",
        ),
        ({"low_balance_threshold_usd": ""}, "This field may not be blank."),
        ({}, "This field is required."),
    ],
)
def test_api_bad_threshold_changes_nothing(owner, payload, message):
    Account.objects.filter(pk=owner.account.pk).update(low_balance_threshold_nanousd=USD)

    response = owner.api().patch("/api/credits/balance", payload, format="json")

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "invalid",
            "message": f"low_balance_threshold_usd: {message}",
            "fields": {"low_balance_threshold_usd": [message]},
        }
    }
    owner.account.refresh_from_db()
    assert owner.account.low_balance_threshold_nanousd == USD


def test_api_threshold_frozen_account_403(owner):
    Account.objects.filter(pk=owner.account.pk).update(is_frozen=True)

    response = owner.api().patch(
        "/api/credits/balance", {"low_balance_threshold_usd": "5.00"}, format="json"
    )

    assert response.status_code == 403
    owner.account.refresh_from_db()
    assert owner.account.low_balance_threshold_nanousd is None


def test_api_threshold_needs_management_scope(owner):
    from rest_framework.test import APIClient

    from gateway.services import access_key_create

    created = access_key_create(account=owner.account, name="gw", scopes=["inference"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {created.raw_key}")

    response = client.patch(
        "/api/credits/balance", {"low_balance_threshold_usd": "5.00"}, format="json"
    )

    assert response.status_code == 403
    owner.account.refresh_from_db()
    assert owner.account.low_balance_threshold_nanousd is None


# The threshold on the credits page


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize("role", ["owner", "admin"])
def test_credits_page_sets_threshold(owner, admin_user, role):
    client = logged_in(owner.user if role == "owner" else admin_user)

    response = client.post(reverse("credits"), {"threshold": "$7.50"})

    assert response.status_code == 303
    assert response["Location"] == reverse("credits")
    owner.account.refresh_from_db()
    assert owner.account.low_balance_threshold_nanousd == 7_500_000_000
    page = client.get(reverse("credits")).content.decode()
    assert "Owners and admins get an email when the balance drops below $7.50." in page
    assert 'value="7.50"' in page

    response = client.post(reverse("credits"), {"threshold": ""})

    assert response.status_code == 303
    owner.account.refresh_from_db()
    assert owner.account.low_balance_threshold_nanousd is None
    assert "The low-balance alert is off." in client.get(reverse("credits")).content.decode()


def test_credits_page_member_gets_403(owner, member):
    Account.objects.filter(pk=owner.account.pk).update(low_balance_threshold_nanousd=2 * USD)
    client = logged_in(member)

    page = client.get(reverse("credits")).content.decode()
    response = client.post(reverse("credits"), {"threshold": "9.00"})

    assert 'data-testid="alert-threshold">$2.00<' in page
    assert 'name="threshold"' not in page
    assert response.status_code == 403
    owner.account.refresh_from_db()
    assert owner.account.low_balance_threshold_nanousd == 2 * USD


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "Enter an amount in USD such as 10.00, with at most nine decimal places."),
        ("-5", "Enter an amount in USD such as 10.00, with at most nine decimal places."),
        ("2000000", "The low-balance threshold must be from USD 0 to USD 1,000,000."),
    ],
)
def test_credits_page_bad_threshold_changes_nothing(owner, text, message):
    client = logged_in(owner.user)

    response = client.post(reverse("credits"), {"threshold": text})

    assert response.status_code == 200
    assert message in response.content.decode()
    owner.account.refresh_from_db()
    assert owner.account.low_balance_threshold_nanousd is None


def test_credits_page_outsider_sets_own_threshold(owner, outsider):
    client = logged_in(outsider.user)

    response = client.post(reverse("credits"), {"threshold": "1.00"})

    assert response.status_code == 303
    outsider.account.refresh_from_db()
    owner.account.refresh_from_db()
    assert outsider.account.low_balance_threshold_nanousd == USD
    assert owner.account.low_balance_threshold_nanousd is None
