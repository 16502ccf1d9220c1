"""Acts of support staff: grants, expiry extensions, voids, freezes, each with its audit record."""

from datetime import UTC, datetime, timedelta

import pytest
from django.core.cache import cache
from django.utils import timezone

from accounts.models import Account, User
from credits.models import AuditRecord, CreditLot, LedgerEntry, LedgerTransaction
from credits.services import (
    CreditsError,
    account_balance,
    account_balance_cached,
    account_freeze,
    account_unfreeze,
    balance_cache_key,
    balance_generation,
    credit_grant,
    credit_lot_expire,
    credit_lot_expiry_extend,
    credit_lot_void,
    ledger_violations,
    lot_expiry_for,
    promotional_credit_grant,
    usage_debit,
    usd_amount_parse,
)
from gateway.services import ACCESS_KEY_CACHE_KEY, access_key_authenticate

USD = 1_000_000_000


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user(email="support@example.com", password="x", is_staff=True)


@pytest.fixture
def now() -> datetime:
    """The present, to the second, so that ISO strings in audit records are predictable."""
    return timezone.now().astimezone(UTC).replace(microsecond=0)


def snapshot(*accounts: Account) -> dict:
    """Everything a staff act could change, to assert that a refused act changed nothing."""
    state = {}
    for account in accounts:
        account.refresh_from_db()
        state[account.pk] = {
            "account": (account.is_frozen, account.debt_nanousd),
            "lots": list(
                CreditLot.objects.filter(account=account)
                .order_by("id")
                .values_list("id", "status", "remaining_nanousd", "expires_at", "expired_at")
            ),
            "transactions": LedgerTransaction.objects.filter(account=account).count(),
            "entries": LedgerEntry.objects.filter(account=account).count(),
            "audit": AuditRecord.objects.filter(account=account).count(),
        }
    return state


def assert_ledger_sound(*accounts: Account) -> None:
    for account in accounts:
        account.refresh_from_db()
        assert ledger_violations(account=account) == []


def audit_fields(record: AuditRecord) -> dict:
    return {
        "account": record.account_id,
        "action": record.action,
        "actor": record.actor_id,
        "actor_email": record.actor_email,
        "reason": record.reason,
        "created_at": record.created_at,
        "lot": record.lot_id,
        "ledger_transaction": record.ledger_transaction_id,
        "before": record.before,
        "after": record.after,
    }


# Promotional grants


def test_grant_opens_lot_with_audit_record(owner, outsider, staff, now):
    expires_at = now + timedelta(days=30)
    before_outsider = snapshot(outsider.account)

    lot = promotional_credit_grant(
        account=owner.account,
        amount_nanousd=12_345_678_901,
        reason="  Apology for the outage  ",
        actor=staff,
        expires_at=expires_at,
        at=now,
    )

    assert (lot.account_id, lot.source, lot.status) == (owner.account.pk, "grant", "active")
    assert (lot.original_nanousd, lot.remaining_nanousd) == (12_345_678_901, 12_345_678_901)
    assert (lot.created_at, lot.expires_at) == (now, expires_at)
    assert (lot.reason, lot.granted_by) == ("Apology for the outage", staff)
    opening = LedgerTransaction.objects.get(account=owner.account)
    assert (opening.kind, opening.amount_nanousd, opening.balance_after_nanousd) == (
        "grant",
        12_345_678_901,
        12_345_678_901,
    )
    assert (opening.opened_lot, opening.actor, opening.description) == (
        lot,
        staff,
        "Apology for the outage",
    )
    record = AuditRecord.objects.get()
    assert audit_fields(record) == {
        "account": owner.account.pk,
        "action": "credit_grant",
        "actor": staff.pk,
        "actor_email": "support@example.com",
        "reason": "Apology for the outage",
        "created_at": now,
        "lot": lot.pk,
        "ledger_transaction": opening.pk,
        "before": {"balance_nanousd": 0, "debt_nanousd": 0},
        "after": {
            "balance_nanousd": 12_345_678_901,
            "debt_nanousd": 0,
            "lot_id": lot.pk,
            "original_nanousd": 12_345_678_901,
            "expires_at": expires_at.isoformat(),
        },
    }
    assert snapshot(outsider.account) == before_outsider
    assert_ledger_sound(owner.account, outsider.account)


def test_grant_pays_debt_first_expires_in_a_year(owner, staff, now):
    usage_debit(account_id=owner.account.pk, request_id="req_debt", amount_nanousd=700, at=now)

    lot = promotional_credit_grant(
        account=owner.account, amount_nanousd=2 * USD, reason="Goodwill", actor=staff, at=now
    )

    assert lot.remaining_nanousd == 2 * USD - 700
    assert lot.expires_at == lot_expiry_for(now)
    owner.account.refresh_from_db()
    assert owner.account.debt_nanousd == 0
    record = AuditRecord.objects.get()
    assert record.before == {"balance_nanousd": -700, "debt_nanousd": 700}
    assert record.after == {
        "balance_nanousd": 2 * USD - 700,
        "debt_nanousd": 0,
        "lot_id": lot.pk,
        "original_nanousd": 2 * USD,
        "expires_at": lot.expires_at.isoformat(),
    }
    assert_ledger_sound(owner.account)


def test_grant_with_repeated_key_grants_once(owner, staff, now):
    first = promotional_credit_grant(
        account=owner.account,
        amount_nanousd=USD,
        reason="Pilot",
        actor=staff,
        idempotency_key="staff-grant:form-1",
        at=now,
    )
    second = promotional_credit_grant(
        account=owner.account,
        amount_nanousd=USD,
        reason="Pilot",
        actor=staff,
        idempotency_key="staff-grant:form-1",
        at=now + timedelta(seconds=5),
    )

    assert second == first
    assert CreditLot.objects.count() == 1
    assert LedgerTransaction.objects.count() == 1
    assert AuditRecord.objects.count() == 1
    assert account_balance(account_id=owner.account.pk, at=now).balance_nanousd == USD
    assert_ledger_sound(owner.account)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"amount_nanousd": 0}, "more than USD 0"),
        ({"amount_nanousd": -5}, "more than USD 0"),
        ({"amount_nanousd": 1_000_000 * USD + 1}, "at most USD 1,000,000"),
        ({"amount_nanousd": True}, "whole number of nano-dollars"),
        ({"amount_nanousd": 1.5}, "whole number of nano-dollars"),
        ({"reason": ""}, "A reason is required."),
        ({"reason": "   "}, "A reason is required."),
        ({"reason": "x" * 501}, "at most 500 characters"),
        ({"expires_at": "past"}, "The expiry must be in the future."),
        ({"actor": "owner"}, "Only active support staff can do this."),
        ({"actor": None}, "Only active support staff can do this."),
    ],
)
def test_grant_bad_input_changes_nothing(owner, outsider, staff, now, changes, message):
    arguments = {
        "account": owner.account,
        "amount_nanousd": USD,
        "reason": "Pilot",
        "actor": staff,
        "at": now,
        **changes,
    }
    if changes.get("expires_at") == "past":
        arguments["expires_at"] = now - timedelta(seconds=1)
    if changes.get("actor") == "owner":
        arguments["actor"] = owner.user
    before = snapshot(owner.account, outsider.account)

    with pytest.raises(CreditsError, match=message):
        promotional_credit_grant(**arguments)

    assert snapshot(owner.account, outsider.account) == before
    assert_ledger_sound(owner.account)


def test_grant_rejects_other_accounts_key(owner, outsider, staff, now):
    promotional_credit_grant(
        account=outsider.account,
        amount_nanousd=USD,
        reason="Pilot",
        actor=staff,
        idempotency_key="staff-grant:shared",
        at=now,
    )
    before = snapshot(owner.account, outsider.account)

    with pytest.raises(CreditsError, match="belongs to another operation"):
        promotional_credit_grant(
            account=owner.account,
            amount_nanousd=USD,
            reason="Pilot",
            actor=staff,
            idempotency_key="staff-grant:shared",
            at=now,
        )

    assert snapshot(owner.account, outsider.account) == before


# Expiry extension


def test_extension_moves_expiry_without_ledger_write(
    owner, staff, now, django_capture_on_commit_callbacks
):
    lot = credit_grant(
        account=owner.account,
        amount_nanousd=3 * USD,
        reason="trial",
        at=now - timedelta(days=20),
        expires_at=now + timedelta(days=5),
    )
    usage_debit(account_id=owner.account.pk, request_id="req_1", amount_nanousd=250, at=now)
    CreditLot.objects.filter(pk=lot.pk).update(expiry_reminder_sent_at=now)
    assert account_balance_cached(account_id=owner.account.pk) == 3 * USD - 250
    generation = balance_generation(account_id=owner.account.pk)
    assert cache.get(balance_cache_key(account_id=owner.account.pk, generation=generation)) == (
        3 * USD - 250
    )
    transactions = LedgerTransaction.objects.count()
    new_expiry = now + timedelta(days=95)

    with django_capture_on_commit_callbacks(execute=True):
        record = credit_lot_expiry_extend(
            lot_id=lot.pk, expires_at=new_expiry, reason="Customer asked", actor=staff, at=now
        )

    lot.refresh_from_db()
    assert (lot.expires_at, lot.remaining_nanousd) == (new_expiry, 3 * USD - 250)
    assert lot.status == "active"
    # The reminder re-arms for the new expiry date.
    assert lot.expiry_reminder_sent_at is None
    assert LedgerTransaction.objects.count() == transactions
    # The extension retires the cached balance, which expired with the old date.
    assert balance_generation(account_id=owner.account.pk) == generation + 1
    assert (
        cache.get(balance_cache_key(account_id=owner.account.pk, generation=generation + 1))
        is None
    )
    assert audit_fields(record) == {
        "account": owner.account.pk,
        "action": "lot_expiry_extend",
        "actor": staff.pk,
        "actor_email": "support@example.com",
        "reason": "Customer asked",
        "created_at": now,
        "lot": lot.pk,
        "ledger_transaction": None,
        "before": {
            "status": "active",
            "remaining_nanousd": 3 * USD - 250,
            "expires_at": (now + timedelta(days=5)).isoformat(),
            "expiry_reminder_sent_at": now.isoformat(),
            "balance_nanousd": 3 * USD - 250,
            "debt_nanousd": 0,
        },
        "after": {
            "status": "active",
            "remaining_nanousd": 3 * USD - 250,
            "expires_at": new_expiry.isoformat(),
            "expiry_reminder_sent_at": None,
            "balance_nanousd": 3 * USD - 250,
            "debt_nanousd": 0,
        },
    }
    assert_ledger_sound(owner.account)


def test_extension_revives_unwritten_expired_lot(owner, staff, now):
    lot = credit_grant(
        account=owner.account,
        amount_nanousd=USD,
        reason="trial",
        at=now - timedelta(days=10),
        expires_at=now - timedelta(hours=1),
    )
    assert account_balance(account_id=owner.account.pk, at=now).balance_nanousd == 0

    record = credit_lot_expiry_extend(
        lot_id=lot.pk,
        expires_at=now + timedelta(days=7),
        reason="Expired during the outage",
        actor=staff,
        at=now,
    )

    assert account_balance(account_id=owner.account.pk, at=now).balance_nanousd == USD
    assert record.before["balance_nanousd"] == 0
    assert record.after["balance_nanousd"] == USD
    # The expiry task finds nothing to write now.
    assert credit_lot_expire(lot_id=lot.pk, at=now) is None
    assert_ledger_sound(owner.account)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("earlier", "must be later than the current one"),
        ("same", "must be later than the current one"),
        ("in_the_past", "must be in the future"),
        ("written_off", "remainder is written off"),
        ("voided", "is voided"),
        ("no_reason", "A reason is required."),
        ("not_staff", "Only active support staff can do this."),
        ("unknown_lot", "not found"),
    ],
)
def test_extension_bad_input_changes_nothing(owner, outsider, staff, now, case, message):
    expires_at = now + timedelta(days=5)
    lot = credit_grant(
        account=owner.account,
        amount_nanousd=USD,
        reason="trial",
        at=now - timedelta(days=30),
        expires_at=expires_at,
    )
    arguments = {
        "lot_id": lot.pk,
        "expires_at": now + timedelta(days=60),
        "reason": "Asked",
        "actor": staff,
        "at": now,
    }
    if case == "earlier":
        arguments["expires_at"] = expires_at - timedelta(seconds=1)
    elif case == "same":
        arguments["expires_at"] = expires_at
    elif case == "in_the_past":
        past = credit_grant(
            account=owner.account,
            amount_nanousd=2 * USD,
            reason="old",
            at=now - timedelta(days=30),
            expires_at=now - timedelta(days=2),
        )
        arguments.update(lot_id=past.pk, expires_at=now - timedelta(days=1))
    elif case == "written_off":
        credit_lot_expire(lot_id=lot.pk, at=expires_at)
        arguments["at"] = expires_at + timedelta(days=1)
    elif case == "voided":
        credit_lot_void(lot_id=lot.pk, reason="Fraud", actor=staff, at=now)
    elif case == "no_reason":
        arguments["reason"] = " "
    elif case == "not_staff":
        arguments["actor"] = owner.user
    elif case == "unknown_lot":
        arguments["lot_id"] = lot.pk + 1000
    before = snapshot(owner.account, outsider.account)

    with pytest.raises(CreditsError, match=message):
        credit_lot_expiry_extend(**arguments)

    assert snapshot(owner.account, outsider.account) == before
    assert_ledger_sound(owner.account)


# Voids


def test_void_writes_entry_for_exact_remainder(
    owner, outsider, staff, now, django_capture_on_commit_callbacks
):
    soon = credit_grant(
        account=owner.account,
        amount_nanousd=2 * USD,
        reason="soon",
        at=now - timedelta(days=1),
        expires_at=now + timedelta(days=10),
    )
    late = credit_grant(
        account=owner.account,
        amount_nanousd=5 * USD,
        reason="late",
        at=now - timedelta(days=1),
        expires_at=now + timedelta(days=100),
    )
    usage_debit(
        account_id=owner.account.pk, request_id="req_1", amount_nanousd=123_456_789, at=now
    )
    before_outsider = snapshot(outsider.account)

    with django_capture_on_commit_callbacks(execute=True):
        voided = credit_lot_void(lot_id=soon.pk, reason="Chargeback fraud", actor=staff, at=now)

    remainder = 2 * USD - 123_456_789
    soon.refresh_from_db()
    late.refresh_from_db()
    assert (soon.status, soon.remaining_nanousd) == ("voided", 0)
    assert (late.status, late.remaining_nanousd) == ("active", 5 * USD)
    assert (voided.kind, voided.amount_nanousd, voided.balance_after_nanousd) == (
        "void",
        -remainder,
        5 * USD,
    )
    assert (voided.idempotency_key, voided.actor, voided.description) == (
        f"void:{soon.pk}",
        staff,
        f"Lot {soon.pk} voided by support",
    )
    assert list(voided.entries.values_list("lot_id", "amount_nanousd")) == [(soon.pk, -remainder)]
    assert account_balance_cached(account_id=owner.account.pk) == 5 * USD
    record = AuditRecord.objects.get()
    assert audit_fields(record) == {
        "account": owner.account.pk,
        "action": "lot_void",
        "actor": staff.pk,
        "actor_email": "support@example.com",
        "reason": "Chargeback fraud",
        "created_at": now,
        "lot": soon.pk,
        "ledger_transaction": voided.pk,
        "before": {
            "status": "active",
            "remaining_nanousd": remainder,
            "expires_at": (now + timedelta(days=10)).isoformat(),
            "expiry_reminder_sent_at": None,
            "balance_nanousd": 7 * USD - 123_456_789,
            "debt_nanousd": 0,
        },
        "after": {
            "status": "voided",
            "remaining_nanousd": 0,
            "expires_at": (now + timedelta(days=10)).isoformat(),
            "expiry_reminder_sent_at": None,
            "balance_nanousd": 5 * USD,
            "debt_nanousd": 0,
        },
    }
    assert snapshot(outsider.account) == before_outsider
    assert_ledger_sound(owner.account, outsider.account)


def test_void_twice_writes_once(owner, staff, now):
    lot = credit_grant(account=owner.account, amount_nanousd=USD, reason="trial", at=now)
    first = credit_lot_void(lot_id=lot.pk, reason="Fraud", actor=staff, at=now)
    before = snapshot(owner.account)

    second = credit_lot_void(
        lot_id=lot.pk, reason="Again", actor=staff, at=now + timedelta(minutes=1)
    )

    assert second == first
    assert snapshot(owner.account) == before
    assert AuditRecord.objects.count() == 1
    assert_ledger_sound(owner.account)


def test_void_of_spent_lot_is_zero(owner, staff, now):
    lot = credit_grant(account=owner.account, amount_nanousd=1000, reason="tiny", at=now)
    usage_debit(account_id=owner.account.pk, request_id="req_all", amount_nanousd=1500, at=now)

    voided = credit_lot_void(lot_id=lot.pk, reason="Closed", actor=staff, at=now)

    lot.refresh_from_db()
    assert (lot.status, lot.remaining_nanousd) == ("voided", 0)
    assert (voided.amount_nanousd, voided.balance_after_nanousd) == (0, -500)
    assert voided.entries.count() == 0
    assert_ledger_sound(owner.account)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("expired", "has expired"),
        ("frozen", "only active lots can be voided"),
        ("no_reason", "A reason is required."),
        ("not_staff", "Only active support staff can do this."),
        ("unknown_lot", "not found"),
    ],
)
def test_void_bad_input_changes_nothing(owner, outsider, staff, now, case, message):
    lot = credit_grant(
        account=owner.account,
        amount_nanousd=USD,
        reason="trial",
        at=now - timedelta(days=30),
        expires_at=now + timedelta(days=1),
    )
    arguments = {"lot_id": lot.pk, "reason": "Fraud", "actor": staff, "at": now}
    if case == "expired":
        arguments["at"] = now + timedelta(days=1)
    elif case == "frozen":
        CreditLot.objects.filter(pk=lot.pk).update(status=CreditLot.Status.FROZEN)
    elif case == "no_reason":
        arguments["reason"] = ""
    elif case == "not_staff":
        arguments["actor"] = owner.user
    elif case == "unknown_lot":
        arguments["lot_id"] = lot.pk + 1000
    before = snapshot(owner.account, outsider.account)

    with pytest.raises(CreditsError, match=message):
        credit_lot_void(**arguments)

    assert snapshot(owner.account, outsider.account) == before
    assert_ledger_sound(owner.account)


# Freezing


def test_freeze_stops_cached_key_at_once(
    owner, outsider, staff, now, django_capture_on_commit_callbacks
):
    identity = access_key_authenticate(raw_key=owner.key.raw_key)
    assert identity is not None and identity.account_frozen is False
    cache_key = ACCESS_KEY_CACHE_KEY.format(key_hash=owner.key.access_key.key_hash)
    assert cache.get(cache_key) is not None
    outsider_identity = access_key_authenticate(raw_key=outsider.key.raw_key)
    assert outsider_identity is not None
    outsider_key = ACCESS_KEY_CACHE_KEY.format(key_hash=outsider.key.access_key.key_hash)

    with django_capture_on_commit_callbacks(execute=True):
        record = account_freeze(
            account=owner.account, reason="Suspected key leak", actor=staff, at=now
        )

    owner.account.refresh_from_db()
    assert owner.account.is_frozen is True
    assert cache.get(cache_key) is None
    assert access_key_authenticate(raw_key=owner.key.raw_key).account_frozen is True
    # Other accounts' cached keys stay cached.
    assert cache.get(outsider_key) is not None
    response = owner.api().post("/api/credits/checkout-session", {"amount": 500}, format="json")
    assert response.status_code == 403
    assert response.json()["error"]["message"] == "This account is frozen; contact support."
    assert audit_fields(record) == {
        "account": owner.account.pk,
        "action": "account_freeze",
        "actor": staff.pk,
        "actor_email": "support@example.com",
        "reason": "Suspected key leak",
        "created_at": now,
        "lot": None,
        "ledger_transaction": None,
        "before": {"is_frozen": False},
        "after": {"is_frozen": True},
    }
    outsider.account.refresh_from_db()
    assert outsider.account.is_frozen is False
    assert_ledger_sound(owner.account)


def test_freeze_twice_then_unfreeze(owner, staff, now, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        account_freeze(account=owner.account, reason="Leak", actor=staff, at=now)
    access_key_authenticate(raw_key=owner.key.raw_key)

    assert account_freeze(account=owner.account, reason="Leak", actor=staff, at=now) is None
    with django_capture_on_commit_callbacks(execute=True):
        record = account_unfreeze(
            account=owner.account, reason="Key rotated", actor=staff, at=now + timedelta(hours=1)
        )

    owner.account.refresh_from_db()
    assert owner.account.is_frozen is False
    assert access_key_authenticate(raw_key=owner.key.raw_key).account_frozen is False
    assert (record.action, record.before, record.after, record.reason) == (
        "account_unfreeze",
        {"is_frozen": True},
        {"is_frozen": False},
        "Key rotated",
    )
    assert list(AuditRecord.objects.order_by("id").values_list("action", flat=True)) == [
        "account_freeze",
        "account_unfreeze",
    ]
    assert account_unfreeze(account=owner.account, reason="Again", actor=staff) is None
    assert AuditRecord.objects.count() == 2


@pytest.mark.parametrize(
    ("reason", "actor", "message"),
    [
        ("", "staff", "A reason is required."),
        ("Leak", "owner", "Only active support staff can do this."),
        ("Leak", "inactive", "Only active support staff can do this."),
    ],
)
def test_freeze_bad_input_changes_nothing(owner, staff, reason, actor, message):
    if actor == "inactive":
        staff.is_active = False
        staff.save(update_fields=["is_active"])
    actors = {"staff": staff, "owner": owner.user, "inactive": staff}
    before = snapshot(owner.account)

    with pytest.raises(CreditsError, match=message):
        account_freeze(account=owner.account, reason=reason, actor=actors[actor])

    assert snapshot(owner.account) == before


# Typed amounts


@pytest.mark.parametrize(
    ("text", "nanousd"),
    [
        ("10.00", 10 * USD),
        ("$0.5", 500_000_000),
        (" 0.000000001 ", 1),
        ("1000000", 1_000_000 * USD),
    ],
)
def test_usd_amount_parse_exact_nanousd(text, nanousd):
    assert usd_amount_parse(text) == nanousd


@pytest.mark.parametrize(
    "text", ["", "abc", "-1", "1e5", "1e999999", "10.0000000001", "1,000", "NaN", "١٠"]
)
def test_usd_amount_parse_rejects_other_text(text):
    with pytest.raises(CreditsError, match="Enter an amount in USD such as 10.00"):
        usd_amount_parse(text)
