"""The Django admin for support staff: audited actions, read-only audit records, keys by prefix."""

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from accounts.models import Account, User
from credits.models import AuditRecord, CreditLot, LedgerTransaction
from credits.services import credit_grant, ledger_violations

USD = 1_000_000_000
NOT_USD = "Enter an amount in USD such as 10.00, with at most nine decimal places."
ACCOUNTS = "/admin/accounts/account/"
LOTS = "/admin/credits/creditlot/"
AUDIT = "/admin/credits/auditrecord/"


@pytest.fixture
def support(db) -> User:
    return User.objects.create_superuser(email="support@example.com", password="x")


@pytest.fixture
def support_client(support) -> Client:
    client = Client()
    client.force_login(support)
    return client


@pytest.fixture
def viewer_client(db) -> Client:
    """Staff who may look at accounts and lots, but not act on them."""
    viewer = User.objects.create_user(email="viewer@example.com", password="x", is_staff=True)
    viewer.user_permissions.set(
        Permission.objects.filter(codename__in=["view_account", "view_creditlot"])
    )
    client = Client()
    client.force_login(viewer)
    return client


def lot_of(account: Account, **changes) -> CreditLot:
    now = timezone.now()
    arguments = {
        "account": account,
        "amount_nanousd": 3 * USD,
        "reason": "trial",
        "at": now - timedelta(days=1),
        "expires_at": now + timedelta(days=10),
        **changes,
    }
    return credit_grant(**arguments)


def state(*accounts: Account) -> list:
    """What an admin action could change, to assert that a refused one changed nothing."""
    rows = []
    for account in accounts:
        account.refresh_from_db()
        rows.append(
            (
                account.is_frozen,
                account.debt_nanousd,
                list(
                    CreditLot.objects.filter(account=account)
                    .order_by("id")
                    .values_list("status", "remaining_nanousd", "expires_at")
                ),
                LedgerTransaction.objects.filter(account=account).count(),
                AuditRecord.objects.filter(account=account).count(),
            )
        )
    return rows


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


# Freezing


def test_freeze_action_asks_reason_and_audits(support_client, support, owner, outsider):
    selected = {"action": "freeze", "_selected_action": [owner.account.pk]}
    form = support_client.post(ACCOUNTS, selected)

    assert form.status_code == 200
    page = form.content.decode()
    assert "Freeze accounts" in page
    assert 'name="reason"' in page
    assert state(owner.account)[0][0] is False

    response = support_client.post(
        ACCOUNTS,
        {
            "action": "freeze",
            "_selected_action": [owner.account.pk],
            "apply": "yes",
            "reason": "Key posted publicly",
        },
        follow=True,
    )

    assert response.status_code == 200
    assert messages_of(response) == ["Froze acme (acme)."]
    owner.account.refresh_from_db()
    outsider.account.refresh_from_db()
    assert (owner.account.is_frozen, outsider.account.is_frozen) == (True, False)
    record = AuditRecord.objects.get()
    assert (
        record.account,
        record.action,
        record.actor,
        record.actor_email,
        record.reason,
        record.lot,
        record.ledger_transaction,
        record.before,
        record.after,
    ) == (
        owner.account,
        "account_freeze",
        support,
        "support@example.com",
        "Key posted publicly",
        None,
        None,
        {"is_frozen": False},
        {"is_frozen": True},
    )


def test_freeze_action_without_reason_changes_nothing(support_client, owner):
    before = state(owner.account)

    response = support_client.post(
        ACCOUNTS,
        {"action": "freeze", "_selected_action": [owner.account.pk], "apply": "yes", "reason": ""},
    )

    assert response.status_code == 200
    assert "This field is required." in response.content.decode()
    assert state(owner.account) == before


def test_unfreeze_action_writes_record(support_client, owner):
    Account.objects.filter(pk=owner.account.pk).update(is_frozen=True)

    response = support_client.post(
        ACCOUNTS,
        {
            "action": "unfreeze",
            "_selected_action": [owner.account.pk],
            "apply": "yes",
            "reason": "Keys rotated",
        },
        follow=True,
    )

    assert messages_of(response) == ["Unfroze acme (acme)."]
    owner.account.refresh_from_db()
    assert owner.account.is_frozen is False
    assert list(AuditRecord.objects.values_list("action", "reason")) == [
        ("account_unfreeze", "Keys rotated")
    ]


# Grants


def test_grant_action_grants_typed_dollars_once(support_client, support, owner, outsider):
    form = support_client.post(
        ACCOUNTS, {"action": "grant_credits", "_selected_action": [owner.account.pk]}
    )
    token = form.context["form"]["token"].value()
    submission = {
        "action": "grant_credits",
        "_selected_action": [owner.account.pk],
        "apply": "yes",
        "amount": "12.345678901",
        "expires_at": "2031-01-31 12:00",
        "reason": "Outage credit",
        "token": token,
    }

    response = support_client.post(ACCOUNTS, submission, follow=True)
    # The browser sends the same page again: nothing more is granted.
    support_client.post(ACCOUNTS, submission)

    lot = CreditLot.objects.get()
    assert (lot.account, lot.source, lot.original_nanousd, lot.remaining_nanousd) == (
        owner.account,
        "grant",
        12_345_678_901,
        12_345_678_901,
    )
    assert lot.expires_at == datetime(2031, 1, 31, 12, 0, tzinfo=UTC)
    assert (lot.reason, lot.granted_by) == ("Outage credit", support)
    assert messages_of(response) == [
        f"Granted 12.345678901 USD to acme (acme) as lot {lot.pk}, expiring 2031-01-31 12:00 UTC."
    ]
    record = AuditRecord.objects.get()
    assert (record.action, record.lot, record.reason, record.before, record.after) == (
        "credit_grant",
        lot,
        "Outage credit",
        {"balance_nanousd": 0, "debt_nanousd": 0},
        {
            "balance_nanousd": 12_345_678_901,
            "debt_nanousd": 0,
            "lot_id": lot.pk,
            "original_nanousd": 12_345_678_901,
            "expires_at": "2031-01-31T12:00:00+00:00",
        },
    )
    assert record.ledger_transaction == LedgerTransaction.objects.get()
    assert not CreditLot.objects.filter(account=outsider.account).exists()
    owner.account.refresh_from_db()
    assert ledger_violations(account=owner.account) == []


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("abc", NOT_USD),
        ("-1", NOT_USD),
        ("1e5", NOT_USD),
        ("0.0000000001", NOT_USD),
        ("0", "The amount must be more than USD 0 and at most USD 1,000,000."),
        ("1000000.01", "The amount must be more than USD 0 and at most USD 1,000,000."),
    ],
)
def test_grant_action_bad_amount_changes_nothing(support_client, owner, amount, message):
    before = state(owner.account)

    response = support_client.post(
        ACCOUNTS,
        {
            "action": "grant_credits",
            "_selected_action": [owner.account.pk],
            "apply": "yes",
            "amount": amount,
            "reason": "Outage credit",
            "token": "t1",
        },
        follow=True,
    )

    assert response.status_code == 200
    assert message in response.content.decode()
    assert state(owner.account) == before


# Lots


def test_extend_action_moves_expiry(support_client, support, owner):
    lot = lot_of(owner.account)
    transactions = LedgerTransaction.objects.count()

    form = support_client.post(LOTS, {"action": "extend_expiry", "_selected_action": [lot.pk]})
    response = support_client.post(
        LOTS,
        {
            "action": "extend_expiry",
            "_selected_action": [lot.pk],
            "apply": "yes",
            "expires_at": "2031-06-30 00:00",
            "reason": "Customer on leave",
        },
        follow=True,
    )

    assert "Extend the expiry" in form.content.decode()
    assert messages_of(response) == [f"Lot {lot.pk} now expires at 2031-06-30 00:00 UTC."]
    lot.refresh_from_db()
    assert lot.expires_at == datetime(2031, 6, 30, tzinfo=UTC)
    assert LedgerTransaction.objects.count() == transactions
    record = AuditRecord.objects.get()
    assert (record.action, record.lot, record.actor, record.reason) == (
        "lot_expiry_extend",
        lot,
        support,
        "Customer on leave",
    )
    assert record.after["expires_at"] == "2031-06-30T00:00:00+00:00"


def test_extend_action_earlier_date_changes_nothing(support_client, owner):
    lot = lot_of(owner.account)
    before = state(owner.account)

    response = support_client.post(
        LOTS,
        {
            "action": "extend_expiry",
            "_selected_action": [lot.pk],
            "apply": "yes",
            "expires_at": "2020-01-01 00:00",
            "reason": "Oops",
        },
        follow=True,
    )

    assert len(messages_of(response)) == 1
    assert "The new expiry must be later than the current one" in messages_of(response)[0]
    assert state(owner.account) == before


def test_void_action_voids_remainder(support_client, support, owner, outsider):
    lot = lot_of(owner.account)
    theirs = lot_of(outsider.account)

    response = support_client.post(
        LOTS,
        {
            "action": "void",
            "_selected_action": [lot.pk],
            "apply": "yes",
            "reason": "Granted by mistake",
        },
        follow=True,
    )

    assert messages_of(response) == [f"Voided lot {lot.pk}: 3.000000000 USD removed."]
    lot.refresh_from_db()
    theirs.refresh_from_db()
    assert (lot.status, lot.remaining_nanousd) == ("voided", 0)
    assert (theirs.status, theirs.remaining_nanousd) == ("active", 3 * USD)
    void = LedgerTransaction.objects.get(kind="void")
    assert (void.account, void.amount_nanousd, void.balance_after_nanousd, void.actor) == (
        owner.account,
        -3 * USD,
        0,
        support,
    )
    assert AuditRecord.objects.get().ledger_transaction == void
    owner.account.refresh_from_db()
    assert ledger_violations(account=owner.account) == []


# Who may act


def test_admin_rejects_non_staff_owner(owner):
    client = Client()
    client.force_login(owner.user)
    lot = lot_of(owner.account)
    before = state(owner.account)

    for url, action in [(ACCOUNTS, "freeze"), (LOTS, "void"), (ACCOUNTS, "grant_credits")]:
        selected = owner.account.pk if url == ACCOUNTS else lot.pk
        response = client.post(
            url,
            {
                "action": action,
                "_selected_action": [selected],
                "apply": "yes",
                "reason": "Mine",
                "amount": "100.00",
                "token": "t",
            },
        )
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")

    assert state(owner.account) == before


def test_admin_actions_need_support_permission(viewer_client, support_client, owner):
    lot = lot_of(owner.account)
    before = state(owner.account)

    page = viewer_client.get(ACCOUNTS).content.decode()
    response = viewer_client.post(
        LOTS,
        {"action": "void", "_selected_action": [lot.pk], "apply": "yes", "reason": "Mine"},
    )

    assert 'value="freeze"' not in page
    assert 'value="grant_credits"' not in page
    assert 'value="freeze"' in support_client.get(ACCOUNTS).content.decode()
    assert response.status_code in (200, 302)
    assert state(owner.account) == before


# Read-only views


def test_audit_records_are_read_only(support_client, owner):
    support_client.post(
        ACCOUNTS,
        {
            "action": "freeze",
            "_selected_action": [owner.account.pk],
            "apply": "yes",
            "reason": "Key posted publicly",
        },
    )
    record = AuditRecord.objects.get()

    listing = support_client.get(AUDIT).content.decode()
    detail = support_client.get(f"{AUDIT}{record.pk}/change/").content.decode()

    assert "Key posted publicly" in listing
    assert "support@example.com" in listing
    assert "&quot;is_frozen&quot;: true" in detail
    assert support_client.get(f"{AUDIT}add/").status_code == 403
    assert support_client.post(f"{AUDIT}{record.pk}/delete/", {"post": "yes"}).status_code == 403
    support_client.post(f"{AUDIT}{record.pk}/change/", {"reason": "Edited"})
    record.refresh_from_db()
    assert record.reason == "Key posted publicly"


def test_account_page_shows_key_prefix_not_hash(support_client, owner):
    key = owner.key.access_key

    page = support_client.get(f"{ACCOUNTS}{owner.account.pk}/change/").content.decode()

    assert key.display in page
    assert key.key_hash not in page
    assert owner.key.raw_key not in page
    # Freezing goes through the audited action, not the form.
    assert 'name="is_frozen"' not in page
    assert 'name="low_balance_threshold_nanousd"' not in page


def test_admin_index_stripe_models(admin_client):
    page = admin_client.get("/admin/").content.decode()

    listed = set(re.findall(r'href="/admin/djstripe/(\w+)/"', page))
    assert listed == {
        "charge",
        "customer",
        "dispute",
        "event",
        "paymentintent",
        "refund",
        "session",
        "webhookendpoint",
        "webhookeventtrigger",
    }
    assert admin_client.get("/admin/djstripe/subscription/").status_code == 404
    # The rows mirror Stripe's objects, so none is added or deleted here.
    assert admin_client.get("/admin/djstripe/charge/").status_code == 200
    assert admin_client.get("/admin/djstripe/charge/add/").status_code == 403
    assert 'href="/admin/djstripe/charge/add/"' not in page
    # allauth's section has a name of its own, apart from Tollbooth's accounts.
    assert "Sign-in email addresses" in page
    assert re.findall(r"<a href=\"/admin/(\w+)/\" class=\"section\"[^>]*>Accounts</a>", page) == [
        "accounts"
    ]
