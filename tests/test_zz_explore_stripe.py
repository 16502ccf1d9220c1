import json
import httpx
import pytest
from django.test import Client
from credits.services import checkout_session_create, stripe_webhook_endpoint_configure
from devtools.stripe_server import sign_payload, encode_event
from djstripe.models import Event, WebhookEventTrigger

SECRET = "whsec_explore0000000000000000"

def post(client, url, event):
    payload = encode_event(event)
    return client.post(url, data=payload, content_type="application/json", HTTP_STRIPE_SIGNATURE=sign_payload(payload, SECRET))

def test_explore(owner, stripe_url):
    url = stripe_webhook_endpoint_configure(secret=SECRET, public_url="http://testserver")
    path = url.removeprefix("http://testserver")
    client = Client()
    created = checkout_session_create(account=owner.account, amount_cents=1000, user=owner.user)
    paid = httpx.post(f"{stripe_url}/_test/sessions/{created['id']}/pay").json()
    r = post(client, path, paid["event"])
    print("completed", r.status_code, r.content[:300])
    refund = httpx.post(f"{stripe_url}/_test/sessions/{created['id']}/refund", data={"amount": 300}).json()
    r = post(client, path, refund["event"])
    print("refunded", r.status_code, r.content[:300])
    d = httpx.post(f"{stripe_url}/_test/sessions/{created['id']}/dispute").json()
    r = post(client, path, d["event"])
    print("dispute", r.status_code, r.content[:300])
    c = httpx.post(f"{stripe_url}/_test/disputes/{d['dispute']['id']}/close", data={"status": "lost"}).json()
    r = post(client, path, c["event"])
    print("closed", r.status_code, r.content[:300])
    for t in WebhookEventTrigger.objects.all():
        print(t.valid, t.processed, t.exception[:500], t.traceback[-1500:])
    from credits.models import LedgerTransaction
    for t in LedgerTransaction.objects.order_by("id"):
        print(t.kind, t.amount_nanousd, t.balance_after_nanousd, t.description, list(t.entries.values_list("lot_id", "amount_nanousd")))
    from djstripe.models import Charge, Refund, Dispute, BalanceTransaction
    print(Charge.objects.count(), Refund.objects.count(), Dispute.objects.count(), BalanceTransaction.objects.count())
