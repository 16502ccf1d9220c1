"""Credit lots and the append-only ledger.

Invariants, checked by `manage.py check_ledger`:
- for every lot, `original_nanousd` plus the sum of its entries equals `remaining_nanousd`;
- for every account, `debt_nanousd` equals minus the sum of its entries that have no lot;
- the balance is the remaining amount of spendable lots minus the debt.
"""

from datetime import datetime

from django.conf import settings
from django.db import models
from django.utils import timezone

from accounts.models import Account


class CreditLotQuerySet(models.QuerySet["CreditLot"]):
    def for_account(self, account: Account) -> "CreditLotQuerySet":
        return self.filter(account=account)

    def spendable(self, *, at: datetime) -> "CreditLotQuerySet":
        """Lots that draw-down may use: active and `at < expires_at`."""
        return self.filter(status=CreditLot.Status.ACTIVE, expires_at__gt=at)

    def draw_down_order(self) -> "CreditLotQuerySet":
        return self.order_by("expires_at", "created_at", "id")


class CreditLot(models.Model):
    """Credits from one purchase or grant, spendable until `expires_at`."""

    class Source(models.TextChoices):
        PURCHASE = "purchase", "Purchase"
        GRANT = "grant", "Promotional grant"

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        FROZEN = "frozen", "Frozen (disputed)"
        VOIDED = "voided", "Voided"

    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="credit_lots")
    source = models.CharField(max_length=16, choices=Source.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    original_nanousd = models.BigIntegerField()
    remaining_nanousd = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    # Set once, when the expiry entry for the remainder is written.
    expired_at = models.DateTimeField(null=True, blank=True)
    # When the owners were emailed that the lot expires within a week; cleared when staff extend
    # the expiry, so the new date gets its own reminder.
    expiry_reminder_sent_at = models.DateTimeField(null=True, blank=True)
    # NULL, not "", for grants: the unique constraint must skip lots without a session.
    stripe_checkout_session_id = models.CharField(  # noqa: DJ001
        max_length=255, null=True, blank=True
    )
    stripe_payment_intent_id = models.CharField(max_length=255, blank=True, default="")
    # The charge that paid the lot: refunds and disputes name it.
    stripe_charge_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    amount_cents = models.IntegerField(null=True, blank=True)
    currency = models.CharField(max_length=3, default="usd")
    reason = models.CharField(max_length=255, blank=True, default="")
    granted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )

    objects = CreditLotQuerySet.as_manager()

    class Meta:
        ordering = ["expires_at", "created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["stripe_checkout_session_id"],
                condition=models.Q(stripe_checkout_session_id__isnull=False),
                name="credit_lot_unique_checkout_session",
            ),
            models.CheckConstraint(
                condition=models.Q(original_nanousd__gt=0), name="credit_lot_original_positive"
            ),
            models.CheckConstraint(
                condition=models.Q(remaining_nanousd__gte=0),
                name="credit_lot_remaining_not_negative",
            ),
            models.CheckConstraint(
                condition=models.Q(remaining_nanousd__lte=models.F("original_nanousd")),
                name="credit_lot_remaining_within_original",
            ),
        ]
        indexes = [models.Index(fields=["account", "status", "expires_at"])]

    def __str__(self) -> str:
        return f"Lot {self.pk} of {self.account.slug}"

    def is_spendable(self, *, at: datetime) -> bool:
        return self.status == self.Status.ACTIVE and at < self.expires_at


class LedgerTransaction(models.Model):
    """One ledger operation: a purchase, a grant, a request's charge, an expiry, a refund.

    `amount_nanousd` is the signed change to the balance; `idempotency_key` makes a
    retried or duplicated operation a no-op.
    """

    class Kind(models.TextChoices):
        PURCHASE = "purchase", "Purchase"
        GRANT = "grant", "Promotional grant"
        USAGE = "usage", "Usage"
        EXPIRY = "expiry", "Expiry"
        REFUND = "refund", "Refund"
        VOID = "void", "Void"
        ADJUSTMENT = "adjustment", "Adjustment"
        # A disputed lot leaves the balance and comes back if the dispute is won. The
        # amount is that change to the balance, and there are no entries (see
        # credits/services/payments.py).
        FREEZE = "freeze", "Frozen (disputed)"
        UNFREEZE = "unfreeze", "Unfrozen (dispute won)"

    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="transactions")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    idempotency_key = models.CharField(max_length=255, unique=True)
    amount_nanousd = models.BigIntegerField()
    balance_after_nanousd = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    # The lot a purchase or grant opened; its original amount is this transaction's credit.
    opened_lot = models.OneToOneField(
        CreditLot, null=True, blank=True, on_delete=models.PROTECT, related_name="opening"
    )
    request_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    description = models.CharField(max_length=255, blank=True, default="")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["account", "-created_at", "-id"]),
            # Finds the last transaction other than usage before a charge, which splits
            # a day's usage in the transaction history.
            models.Index(
                fields=["account", "id"],
                condition=~models.Q(kind="usage"),
                name="ledger_tx_not_usage_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.amount_nanousd} on {self.account.slug}"


class LedgerEntry(models.Model):
    """A signed change to one lot, or to the account's debt when `lot` is empty.

    A debit that spans several lots writes one entry per lot touched. A debt entry
    is negative when debt grows and positive when a new lot pays it off.
    """

    transaction = models.ForeignKey(
        LedgerTransaction, on_delete=models.PROTECT, related_name="entries"
    )
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="ledger_entries")
    lot = models.ForeignKey(
        CreditLot, null=True, blank=True, on_delete=models.PROTECT, related_name="entries"
    )
    amount_nanousd = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]
        verbose_name_plural = "ledger entries"
        constraints = [
            models.CheckConstraint(
                condition=~models.Q(amount_nanousd=0), name="ledger_entry_amount_not_zero"
            ),
        ]

    def __str__(self) -> str:
        target = f"lot {self.lot_id}" if self.lot_id else "debt"
        return f"{self.amount_nanousd} on {target}"


class LotRefund(models.Model):
    """A Stripe refund of a purchase, applied to its lot once per refund id.

    The refund voids what it can from the lot's remainder while the lot is spendable;
    the rest becomes debt. Both parts are in nano-dollars and add up to the refund.
    """

    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="lot_refunds")
    lot = models.ForeignKey(CreditLot, on_delete=models.PROTECT, related_name="refunds")
    stripe_refund_id = models.CharField(max_length=255, unique=True)
    stripe_charge_id = models.CharField(max_length=255)
    amount_cents = models.IntegerField()
    voided_nanousd = models.BigIntegerField()
    debt_nanousd = models.BigIntegerField()
    ledger_transaction = models.OneToOneField(
        LedgerTransaction, on_delete=models.PROTECT, related_name="lot_refund"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(amount_cents__gt=0), name="lot_refund_amount_positive"
            ),
            models.CheckConstraint(
                condition=models.Q(voided_nanousd__gte=0, debt_nanousd__gte=0),
                name="lot_refund_parts_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.stripe_refund_id} on lot {self.lot_id}"


class LotDispute(models.Model):
    """A Stripe dispute of a purchase: its lot is frozen while the dispute is open.

    Won, the lot is spendable again; lost, its remainder is voided.
    """

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        WON = "won", "Won"
        LOST = "lost", "Lost"

    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="lot_disputes")
    lot = models.ForeignKey(CreditLot, on_delete=models.PROTECT, related_name="disputes")
    stripe_dispute_id = models.CharField(max_length=255, unique=True)
    stripe_charge_id = models.CharField(max_length=255)
    amount_cents = models.IntegerField()
    reason = models.CharField(max_length=64, blank=True, default="")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    created_at = models.DateTimeField(default=timezone.now)
    closed_at = models.DateTimeField(null=True, blank=True)
    # The FREEZE written when the dispute opened, and the UNFREEZE or VOID that closed it.
    freeze_transaction = models.OneToOneField(
        LedgerTransaction, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    close_transaction = models.OneToOneField(
        LedgerTransaction, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.stripe_dispute_id} on lot {self.lot_id} ({self.status})"


class CheckoutPurchase(models.Model):
    """A Stripe Checkout Session started from Tollbooth, until it becomes a lot."""

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        FULFILLED = "fulfilled", "Fulfilled"
        FAILED = "failed", "Payment failed"
        EXPIRED = "expired", "Expired"

    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="purchases")
    stripe_session_id = models.CharField(max_length=255, unique=True)
    amount_cents = models.IntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    lot = models.OneToOneField(
        CreditLot, null=True, blank=True, on_delete=models.PROTECT, related_name="purchase"
    )

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.stripe_session_id} ({self.status})"


class AuditRecord(models.Model):
    """One act of support staff: who, when, why, and the state before and after.

    Written in the same transaction as the act itself, so an act without its record
    cannot exist. `before` and `after` hold JSON snapshots; money in nano-dollars,
    times in ISO 8601.
    """

    class Action(models.TextChoices):
        CREDIT_GRANT = "credit_grant", "Promotional grant"
        LOT_EXPIRY_EXTEND = "lot_expiry_extend", "Lot expiry extended"
        LOT_VOID = "lot_void", "Lot voided"
        ACCOUNT_FREEZE = "account_freeze", "Account frozen"
        ACCOUNT_UNFREEZE = "account_unfreeze", "Account unfrozen"

    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="audit_records")
    action = models.CharField(max_length=32, choices=Action.choices)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    # Kept as text too, so the record still names the person after their user is deleted.
    actor_email = models.EmailField(blank=True, default="")
    reason = models.CharField(max_length=500)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    lot = models.ForeignKey(
        CreditLot, null=True, blank=True, on_delete=models.PROTECT, related_name="audit_records"
    )
    ledger_transaction = models.ForeignKey(
        LedgerTransaction,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="audit_records",
    )
    before = models.JSONField(default=dict, blank=True)
    after = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=~models.Q(reason=""), name="audit_record_reason_not_empty"
            ),
        ]
        indexes = [models.Index(fields=["account", "-created_at"])]
        permissions = [
            ("support_act", "Can grant credits, extend or void lots and freeze accounts"),
        ]

    def __str__(self) -> str:
        when = f"{self.created_at:%Y-%m-%d %H:%M}"
        return f"{self.get_action_display()} on account {self.account_id} at {when}"
