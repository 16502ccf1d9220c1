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
