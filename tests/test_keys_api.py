from datetime import UTC, datetime, timedelta

import pytest

from gateway.models import AccessKey
from gateway.services import access_key_hash


def test_create_key_returns_it_once_and_stores_hash(owner):
    response = owner.api().post(
        "/api/keys", {"name": "ci", "scopes": ["inference"]}, format="json"
    )

    assert response.status_code == 201
    body = response.json()
    raw_key = body["key"]
    assert raw_key.startswith("tb_")
    stored = AccessKey.objects.get(pk=body["id"])
    assert stored.key_hash == access_key_hash(raw_key)
    assert stored.prefix == raw_key[:11]
    assert stored.last_four == raw_key[-4:]
    assert raw_key not in str(AccessKey.objects.filter(pk=stored.pk).values().get())

    listed = owner.api().get("/api/keys").json()
    assert {key["name"] for key in listed} == {"acme key", "ci"}
    assert all("key" not in key for key in listed)


def test_create_key_rejects_bad_input(owner):
    before = AccessKey.objects.count()
    for payload in ({"name": ""}, {"name": "x", "scopes": ["root"]}, {"name": "x", "scopes": []}):
        response = owner.api().post("/api/keys", payload, format="json")
        assert response.status_code == 400, payload
        assert response.json()["error"]["fields"]
    assert AccessKey.objects.count() == before


def test_revoke_key(owner, django_capture_on_commit_callbacks):
    created = owner.api().post("/api/keys", {"name": "temp"}, format="json").json()

    with django_capture_on_commit_callbacks(execute=True):
        response = owner.api().delete(f"/api/keys/{created['id']}")

    assert response.status_code == 200
    assert response.json()["revoked_at"] is not None
    assert AccessKey.objects.get(pk=created["id"]).revoked_at is not None


def test_outsider_cannot_see_or_revoke_key(owner, outsider):
    key_id = owner.key.access_key.pk

    assert outsider.api().get(f"/api/keys/{key_id}").status_code == 404
    response = outsider.api().delete(f"/api/keys/{key_id}")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert AccessKey.objects.get(pk=key_id).revoked_at is None
    assert [key["id"] for key in outsider.api().get("/api/keys").json()] == [
        outsider.key.access_key.pk
    ]


def test_usage_lists_only_own_records(owner, outsider):
    from gateway.models import UsageRecord

    UsageRecord.objects.create(
        request_id="req_x",
        account=owner.account,
        provider="openai",
        model="gpt-4o-mini",
        surface="openai",
        key_source="builtin",
        status="succeeded",
        cost_nanousd=5600,
    )
    assert outsider.api().get("/api/usage").json()["results"] == []
    rows = owner.api().get("/api/usage").json()["results"]
    assert [(row["request_id"], row["cost_usd"]) for row in rows] == [("req_x", "0.000005600")]


def test_schema_declares_bearer_access_keys(db):
    from rest_framework.test import APIClient

    response = APIClient().get("/api/schema", {"format": "json"})

    assert response.status_code == 200
    schema = response.json()
    assert schema["components"]["securitySchemes"]["accessKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An access key with the `management` scope: `tb_...`.",
    }
    assert schema["paths"]["/api/credits/balance"]["get"]["security"] == [{"accessKey": []}]


def test_usage_filters(owner, outsider):
    from gateway.models import UsageRecord

    second_key = owner.api().post("/api/keys", {"name": "second"}, format="json").json()
    start = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    rows = [
        ("req_a", owner.key.access_key.pk, "openai", "gpt-4o-mini", "succeeded", 0),
        ("req_b", second_key["id"], "openai", "gpt-4o-mini", "upstream_error", 1),
        ("req_c", second_key["id"], "anthropic", "claude-haiku-4-5", "succeeded", 2),
    ]
    for request_id, key_id, provider, model, status, minutes in rows:
        UsageRecord.objects.create(
            request_id=request_id,
            account=owner.account,
            access_key_id=key_id,
            provider=provider,
            model=model,
            surface=provider,
            key_source="builtin",
            status=status,
            created_at=start + timedelta(minutes=minutes),
        )

    def listed(query: str) -> list[str]:
        response = owner.api().get(f"/api/usage{query}")
        assert response.status_code == 200, response.json()
        return [row["request_id"] for row in response.json()["results"]]

    assert listed("") == ["req_c", "req_b", "req_a"]
    assert listed(f"?key={second_key['id']}") == ["req_c", "req_b"]
    assert listed("?status=succeeded") == ["req_c", "req_a"]
    assert listed("?provider=openai&model=gpt-4o-mini") == ["req_b", "req_a"]
    assert listed("?since=2026-05-01T12:01:00Z&until=2026-05-01T12:02:00Z") == ["req_b"]
    assert listed(f"?key={outsider.key.access_key.pk}") == []
    first = owner.api().get("/api/usage?model=claude-haiku-4-5").json()["results"][0]
    assert first["key_id"] == second_key["id"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?status=done", 'status: "done" is not a valid choice.'),
        ("?key=0", "key: Ensure this value is greater than or equal to 1."),
        (
            "?since=2026-05-02T00:00:00Z&until=2026-05-01T00:00:00Z",
            "until must be later than since.",
        ),
    ],
)
def test_usage_filters_reject_bad_input(owner, query, message):
    response = owner.api().get(f"/api/usage{query}")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid"
    assert response.json()["error"]["message"] == message
