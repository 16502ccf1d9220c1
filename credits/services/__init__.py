"""Credit operations. Views, the API, the admin, tasks and webhook receivers call these."""

from credits.services.checkout import (
    LOCAL_WEBHOOK_ENDPOINT_ID,
    checkout_session_create,
    checkout_session_fulfil,
    checkout_sessions_reconcile,
    stripe_webhook_endpoint_configure,
)
from credits.services.ledger import (
    BALANCE_CACHE_KEY,
    Balance,
    CreditsError,
    Debit,
    account_balance,
    account_balance_cached,
    credit_grant,
    credit_lot_expire,
    credit_lots_due_for_expiry,
    credit_lots_expire_due,
    ledger_violations,
    lot_expiry_for,
    purchase_lot_create,
    usage_debit,
)

__all__ = [
    "BALANCE_CACHE_KEY",
    "LOCAL_WEBHOOK_ENDPOINT_ID",
    "Balance",
    "CreditsError",
    "Debit",
    "account_balance",
    "account_balance_cached",
    "checkout_session_create",
    "checkout_session_fulfil",
    "checkout_sessions_reconcile",
    "credit_grant",
    "credit_lot_expire",
    "credit_lots_due_for_expiry",
    "credit_lots_expire_due",
    "ledger_violations",
    "lot_expiry_for",
    "purchase_lot_create",
    "stripe_webhook_endpoint_configure",
    "usage_debit",
]
