"""The usage overview API and the usage page charts, both read from usage rollups.

`owner` and `outsider` come from tests/conftest.py: two accounts, each with one user and
one access key with the inference and management scopes.
"""

import itertools
import re
from datetime import UTC, datetime, timedelta

import pytest
from django.test import Client

from credits.money import format_usd
from gateway.models import AccessKey, UsageRecord, UsageRollup
from gateway.rollups import METRICS, usage_rollups_refresh_due
from gateway.services import access_key_create

# A Wednesday, half past ten UTC: the hour from 10:00 is open, the day of March 12 too.
NOW = datetime(2025, 3, 12, 10, 30, tzinfo=UTC)
MARCH_10 = datetime(2025, 3, 10, tzinfo=UTC)
MARCH_11 = MARCH_10 + timedelta(days=1)
MARCH_12 = MARCH_10 + timedelta(days=2)
_request_ids = itertools.count()


# Fixtures and helpers


@pytest.fixture(autouse=True)
def frozen_now(time_machine) -> datetime:
    time_machine.move_to(NOW, tick=False)
    return NOW


@pytest.fixture
def second_key(owner) -> AccessKey:
    return access_key_create(account=owner.account, name="batch", scopes=["inference"]).access_key


def record(account, *, at: datetime, key=None, **fields) -> UsageRecord:
    """Write a usage record as metering does, with `cost = fee + model cost`."""
    values = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "surface": "openai",
        "key_source": UsageRecord.KeySource.BUILTIN,
        "status": UsageRecord.Status.SUCCEEDED,
        **fields,
    }
    values["cost_nanousd"] = values.get("fee_nanousd", 0) + values.get("model_cost_nanousd", 0)
    return UsageRecord.objects.create(
        request_id=f"req_{next(_request_ids)}",
        account=account,
        access_key=key,
        created_at=at,
        **values,
    )


@pytest.fixture
def usage(owner, outsider, second_key) -> None:
    """Write the owner's and the outsider's records, then roll up every closed window.

    Owner, per UTC day (nano-dollars):
    March 10: A 09:15 openai:gpt-4o-mini, cost 417,083,251; B 23:59:59.999999
              anthropic:claude-haiku-4-5 on the second key, estimated, cost 759.
    March 11: C 00:00 gpt-4o-mini upstream error, cost 0; D 12:00 my-vllm:llama without
              a key, cost 5,000.
    March 12: E 09:10 gpt-4o-mini, cost 3,000; F 10:05, in the open hour, cost 7.
    Outsider: March 10 09:20, cost 99.
    """
    key = owner.key.access_key
    record(
        owner.account,
        at=MARCH_10 + timedelta(hours=9, minutes=15),
        key=key,
        input_tokens=1200,
        output_tokens=345,
        cache_read_tokens=100,
        cache_write_tokens=20,
        reasoning_tokens=45,
        fee_nanousd=83_250,
        model_cost_nanousd=417_000_001,
    )
    record(
        owner.account,
        at=MARCH_11 - timedelta(microseconds=1),
        key=second_key,
        provider="anthropic",
        model="claude-haiku-4-5",
        surface="anthropic",
        usage_estimated=True,
        input_tokens=10,
        output_tokens=5,
        fee_nanousd=750,
        model_cost_nanousd=9,
    )
    record(owner.account, at=MARCH_11, key=key, status=UsageRecord.Status.UPSTREAM_ERROR)
    record(
        owner.account,
        at=MARCH_11 + timedelta(hours=12),
        provider="my-vllm",
        model="llama",
        key_source=UsageRecord.KeySource.CUSTOM,
        input_tokens=100,
        fee_nanousd=5_000,
    )
    record(
        owner.account,
        at=MARCH_12 + timedelta(hours=9, minutes=10),
        key=key,
        fee_nanousd=1_000,
        model_cost_nanousd=2_000,
    )
    record(owner.account, at=MARCH_12 + timedelta(hours=10, minutes=5), key=key, fee_nanousd=7)
    record(
        outsider.account,
        at=MARCH_10 + timedelta(hours=9, minutes=20),
        key=outsider.key.access_key,
        fee_nanousd=99,
    )
    usage_rollups_refresh_due(at=NOW)


def totals(**values: int) -> dict:
    """Return an API totals object: the given sums, zeros elsewhere, USD next to nano-dollars."""
    sums = {name: values.get(name, 0) for name in METRICS}
    for money in ("fee", "model_cost", "cost"):
        sums[f"{money}_usd"] = format_usd(sums[f"{money}_nanousd"])
    return {
        name: sums[name]
        for name in [
            "request_count",
            "succeeded_count",
            "failed_count",
            "estimated_count",
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
            "fee_usd",
            "fee_nanousd",
            "model_cost_usd",
            "model_cost_nanousd",
            "cost_usd",
            "cost_nanousd",
        ]
    }


def group(name: str, label: str | None = None, **fields) -> dict:
    """Return an API group without its totals."""
    return {
        "group": name,
        "label": label or name,
        "provider": fields.get("provider"),
        "model": fields.get("model"),
        "access_key_id": fields.get("access_key_id"),
        "access_key_name": fields.get("access_key_name"),
    }


RECORD_A = {
    "request_count": 1,
    "succeeded_count": 1,
    "input_tokens": 1200,
    "output_tokens": 345,
    "cache_read_tokens": 100,
    "cache_write_tokens": 20,
    "reasoning_tokens": 45,
    "fee_nanousd": 83_250,
    "model_cost_nanousd": 417_000_001,
    "cost_nanousd": 417_083_251,
}
RECORD_B = {
    "request_count": 1,
    "succeeded_count": 1,
    "estimated_count": 1,
    "input_tokens": 10,
    "output_tokens": 5,
    "fee_nanousd": 750,
    "model_cost_nanousd": 9,
    "cost_nanousd": 759,
}
RECORD_C = {"request_count": 1, "failed_count": 1}
RECORD_D = {
    "request_count": 1,
    "succeeded_count": 1,
    "input_tokens": 100,
    "fee_nanousd": 5_000,
    "cost_nanousd": 5_000,
}
RECORD_E = {
    "request_count": 1,
    "succeeded_count": 1,
    "fee_nanousd": 1_000,
    "model_cost_nanousd": 2_000,
    "cost_nanousd": 3_000,
}


def added(*records: dict) -> dict:
    return {name: sum(item.get(name, 0) for item in records) for name in METRICS}


GPT = group("openai:gpt-4o-mini", provider="openai", model="gpt-4o-mini")
HAIKU = group("anthropic:claude-haiku-4-5", provider="anthropic", model="claude-haiku-4-5")
LLAMA = group("my-vllm:llama", provider="my-vllm", model="llama")


# The overview


def test_overview_days_by_model(owner, usage):
    response = owner.api().get(
        "/api/usage/overview?period=day&start=2025-03-10&end=2025-03-12&group_by=model"
    )

    assert response.status_code == 200
    assert response.json() == {
        "period": "day",
        "start": "2025-03-10T00:00:00Z",
        "end": "2025-03-13T00:00:00Z",
        # March 12 is still open, so it is not in the sums.
        "complete_until": "2025-03-12T00:00:00Z",
        "group_by": "model",
        "key": None,
        "totals": {
            "request_count": 4,
            "succeeded_count": 3,
            "failed_count": 1,
            "estimated_count": 1,
            "input_tokens": 1310,
            "output_tokens": 350,
            "cache_read_tokens": 100,
            "cache_write_tokens": 20,
            "reasoning_tokens": 45,
            "fee_usd": "0.000089000",
            "fee_nanousd": 89_000,
            "model_cost_usd": "0.417000010",
            "model_cost_nanousd": 417_000_010,
            "cost_usd": "0.417089010",
            "cost_nanousd": 417_089_010,
        },
        "groups": [
            {**GPT, "totals": totals(**added(RECORD_A, RECORD_C))},
            {**LLAMA, "totals": totals(**RECORD_D)},
            {**HAIKU, "totals": totals(**RECORD_B)},
        ],
        "series": [
            {
                "window_start": "2025-03-10T00:00:00Z",
                "window_end": "2025-03-11T00:00:00Z",
                "totals": totals(**added(RECORD_A, RECORD_B)),
                "groups": [
                    {**GPT, "totals": totals(**RECORD_A)},
                    {**HAIKU, "totals": totals(**RECORD_B)},
                ],
            },
            {
                "window_start": "2025-03-11T00:00:00Z",
                "window_end": "2025-03-12T00:00:00Z",
                "totals": totals(**added(RECORD_C, RECORD_D)),
                "groups": [
                    {**LLAMA, "totals": totals(**RECORD_D)},
                    {**GPT, "totals": totals(**RECORD_C)},
                ],
            },
        ],
    }


def test_overview_totals_equal_records(owner, usage):
    body = owner.api().get("/api/usage/overview?start=2025-03-01&end=2025-03-11").json()

    records = list(UsageRecord.objects.filter(account=owner.account, created_at__lt=MARCH_12))
    for name in METRICS:
        if name.endswith("_tokens") or name.endswith("_nanousd"):
            assert body["totals"][name] == sum(getattr(item, name) for item in records)
    assert body["totals"]["request_count"] == len(records) == 4
    assert body["totals"]["cost_usd"] == "0.417089010"
    assert [window["window_start"][:10] for window in body["series"]] == [
        f"2025-03-{day:02d}" for day in range(1, 12)
    ]
    assert body["groups"] == []
    assert all(window["groups"] == [] for window in body["series"])


def test_overview_hours_closed_only(owner, usage):
    body = owner.api().get("/api/usage/overview?period=hour&start=2025-03-12&end=2025-03-12")

    assert body.status_code == 200
    data = body.json()
    assert data["complete_until"] == "2025-03-12T10:00:00Z"
    assert data["end"] == "2025-03-13T00:00:00Z"
    # 00:00 to 09:00; the record of 10:05 lies in the open hour.
    assert [window["window_start"] for window in data["series"]] == [
        f"2025-03-12T{hour:02d}:00:00Z" for hour in range(10)
    ]
    assert data["totals"] == totals(**RECORD_E)
    assert [window["totals"]["cost_nanousd"] for window in data["series"]] == [0] * 9 + [3_000]


def test_overview_by_key(owner, usage, second_key):
    body = (
        owner.api().get("/api/usage/overview?start=2025-03-10&end=2025-03-11&group_by=key").json()
    )

    key = owner.key.access_key
    assert body["groups"] == [
        {
            **group(
                str(key.pk),
                f"acme key ({key.display})",
                access_key_id=key.pk,
                access_key_name="acme key",
            ),
            "totals": totals(**added(RECORD_A, RECORD_C)),
        },
        {**group("none", "No key"), "totals": totals(**RECORD_D)},
        {
            **group(
                str(second_key.pk),
                f"batch ({second_key.display})",
                access_key_id=second_key.pk,
                access_key_name="batch",
            ),
            "totals": totals(**RECORD_B),
        },
    ]


def test_overview_by_provider(owner, usage):
    body = (
        owner.api()
        .get("/api/usage/overview?start=2025-03-10&end=2025-03-11&group_by=provider")
        .json()
    )

    assert [(item["group"], item["totals"]["cost_nanousd"]) for item in body["groups"]] == [
        ("openai", 417_083_251),
        ("my-vllm", 5_000),
        ("anthropic", 759),
    ]
    assert body["groups"][0] == {
        **group("openai", provider="openai"),
        "totals": totals(**added(RECORD_A, RECORD_C)),
    }


def test_overview_of_one_key(owner, usage):
    key = owner.key.access_key
    body = (
        owner.api().get(f"/api/usage/overview?start=2025-03-10&end=2025-03-11&key={key.pk}").json()
    )

    assert body["key"] == key.pk
    assert body["totals"] == totals(**added(RECORD_A, RECORD_C))


def test_overview_default_thirty_days(owner, usage):
    body = owner.api().get("/api/usage/overview").json()

    assert body["period"] == "day"
    assert body["start"] == "2025-02-11T00:00:00Z"
    assert body["end"] == "2025-03-13T00:00:00Z"
    assert len(body["series"]) == 29
    assert body["totals"]["cost_nanousd"] == 417_089_010


def test_overview_complete_until_lagging_refresh(owner):
    record(owner.account, at=MARCH_10 + timedelta(hours=3), fee_nanousd=10)

    body = owner.api().get("/api/usage/overview?start=2025-03-09&end=2025-03-12").json()

    # Nothing was rolled up yet: March 9 is complete (empty), March 10 is not there yet.
    assert body["complete_until"] == "2025-03-10T00:00:00Z"
    assert body["series"] == [
        {
            "window_start": "2025-03-09T00:00:00Z",
            "window_end": "2025-03-10T00:00:00Z",
            "totals": totals(),
            "groups": [],
        }
    ]
    assert body["totals"] == totals()


# Tenant isolation


def test_overview_outsider_sees_own_usage(outsider, usage):
    body = (
        outsider.api()
        .get("/api/usage/overview?start=2025-03-10&end=2025-03-11&group_by=model")
        .json()
    )

    outsider_record = {
        "request_count": 1,
        "succeeded_count": 1,
        "fee_nanousd": 99,
        "cost_nanousd": 99,
    }
    assert body["totals"] == totals(**outsider_record)
    assert body["groups"] == [{**GPT, "totals": totals(**outsider_record)}]


def test_overview_outsider_key_404(owner, outsider, usage):
    rollups_before = list(UsageRollup.objects.order_by("pk").values())

    response = outsider.api().get(f"/api/usage/overview?key={owner.key.access_key.pk}")

    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": "not_found", "message": "Not found.", "fields": {}}
    }
    assert list(UsageRollup.objects.order_by("pk").values()) == rollups_before


def test_overview_needs_management_scope(owner, usage):
    inference = access_key_create(account=owner.account, name="infer", scopes=["inference"])
    client = owner.api()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {inference.raw_key}")

    response = client.get("/api/usage/overview")

    assert response.status_code == 403
    assert response.json()["error"]["message"] == (
        "This access key lacks the `management` scope needed for the REST API."
    )


def test_overview_needs_a_key():
    response = Client().get("/api/usage/overview")

    assert response.status_code == 401


# Bad parameters


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ("period=week", "period", '"week" is not a valid choice.'),
        ("group_by=account", "group_by", '"account" is not a valid choice.'),
        (
            "start=2025-13-01",
            "start",
            "Date has wrong format. Use one of these formats instead: YYYY-MM-DD.",
        ),
        (
            "end=12/03/2025",
            "end",
            "Date has wrong format. Use one of these formats instead: YYYY-MM-DD.",
        ),
        (
            "start=2025-03-12&end=2025-03-10",
            "start",
            "start (2025-03-12) is after end (2025-03-10).",
        ),
        (
            "period=day&start=2024-01-01&end=2025-02-04",
            "end",
            "The range covers 401 days, more than the 400 allowed for period=day.",
        ),
        (
            "period=hour&start=2025-02-01&end=2025-03-04",
            "end",
            "The range covers 32 days, more than the 31 allowed for period=hour.",
        ),
        # Without `end`, the range runs to today (March 12).
        (
            "period=hour&start=2025-01-01",
            "end",
            "The range covers 71 days, more than the 31 allowed for period=hour.",
        ),
        ("key=abc", "key", "A valid integer is required."),
        ("key=0", "key", "Ensure this value is greater than or equal to 1."),
    ],
)
def test_overview_bad_parameters_400(owner, usage, query, field, message):
    rollups_before = list(UsageRollup.objects.order_by("pk").values())

    response = owner.api().get(f"/api/usage/overview?{query}")

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "invalid",
            "message": message if message.startswith(field) else f"{field}: {message}",
            "fields": {field: [message]},
        }
    }
    assert list(UsageRollup.objects.order_by("pk").values()) == rollups_before


@pytest.mark.parametrize(
    ("query", "windows"),
    [
        ("period=day&start=2024-02-09&end=2025-03-13", 397),
        ("period=hour&start=2025-02-10&end=2025-03-12", 30 * 24 + 10),
    ],
)
def test_overview_maximum_ranges_accepted(owner, usage, query, windows):
    response = owner.api().get(f"/api/usage/overview?{query}")

    assert response.status_code == 200
    assert len(response.json()["series"]) == windows


def test_overview_in_api_schema():
    schema = Client().get("/api/schema?format=json").json()

    operation = schema["paths"]["/api/usage/overview"]["get"]
    assert [parameter["name"] for parameter in operation["parameters"]] == [
        "end",
        "group_by",
        "key",
        "period",
        "start",
    ]
    assert "complete_until" in str(schema["components"]["schemas"]["UsageOverview"])


# The usage page


@pytest.fixture
def owner_client(owner) -> Client:
    client = Client()
    client.force_login(owner.user)
    return client


def _flat(page: str) -> str:
    return re.sub(r"\s+", " ", page)


def test_usage_page_draws_charts(owner_client, usage):
    response = owner_client.get("/usage/")

    assert response.status_code == 200
    page = _flat(response.content.decode())
    svgs = re.findall(r"<svg .*?</svg>", page)
    assert len(svgs) == 2
    spend, requests = svgs
    for svg, title in ((spend, "Spend per day (USD)"), (requests, "Requests per day")):
        chart_id = re.search(r'id="(chart-[0-9a-f-]+)"', svg).group(1)
        assert f'aria-labelledby="{chart_id}-title {chart_id}-desc"' in svg
        assert 'role="img"' in svg
        assert f'<title id="{chart_id}-title">{title}</title>' in svg
        assert "<script" not in svg
    assert "window.pygal" not in page
    # The 30 days end today; today counts its closed hours (record E, not F).
    assert (
        '<desc id="{}-desc">Spend per UTC day from 2025-02-11 to 2025-03-12: '
        "$0.41709201 in total.</desc>"
    ).format(re.search(r'id="(chart-[0-9a-f-]+)"', spend).group(1)) in spend
    assert "Requests per UTC day from 2025-02-11 to 2025-03-12: 5 in total." in requests
    assert "<title>2025-03-10: $0.41708401</title>" in spend
    assert "<title>2025-03-11: 2</title>" in requests
    assert 'data-testid="usage-chart-totals">5 requests, $0.41709201<' in page
    assert "2025-03-12 10:00 UTC" in page
    rows = re.findall(r'<tr> <th scope="row">.*?</tr>', page)
    assert len(rows) == 30
    assert rows[-3:] == [
        '<tr> <th scope="row"><time datetime="2025-03-10">2025-03-10</time></th> '
        '<td class="num">2</td> <td class="num mono" title="417084010 nano-dollars">'
        "$0.41708401</td> </tr>",
        '<tr> <th scope="row"><time datetime="2025-03-11">2025-03-11</time></th> '
        '<td class="num">2</td> <td class="num mono" title="5000 nano-dollars">'
        "$0.000005</td> </tr>",
        '<tr> <th scope="row"><time datetime="2025-03-12">2025-03-12</time></th> '
        '<td class="num">1</td> <td class="num mono" title="3000 nano-dollars">'
        "$0.000003</td> </tr>",
    ]
    assert rows[0] == (
        '<tr> <th scope="row"><time datetime="2025-02-11">2025-02-11</time></th> '
        '<td class="num">0</td> <td class="num mono" title="0 nano-dollars">$0.00</td> </tr>'
    )


def test_usage_page_outsider_sees_own_usage(outsider, usage):
    client = Client()
    client.force_login(outsider.user)

    page = _flat(client.get("/usage/").content.decode())

    assert 'data-testid="usage-chart-totals">1 request, $0.000000099<' in page
    assert "$0.41708401" not in page
    assert "2025-03-10: $0.000000099" in page


def test_usage_page_empty_charts(owner_client):
    response = owner_client.get("/usage/")

    page = _flat(response.content.decode())
    assert response.status_code == 200
    assert len(re.findall(r"<svg .*?</svg>", page)) == 2
    assert 'data-testid="usage-chart-totals">0 requests, $0.00<' in page
    assert "No requests yet." in page
