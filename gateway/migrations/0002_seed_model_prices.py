"""Seed the price table with public list prices, USD per million tokens.

Sources: openai.com/api/pricing and anthropic.com/pricing (standard tier, as listed in
2025). Staff edit prices in the admin; a new row with a later `effective_from` replaces
a price from that instant on.
"""

from datetime import UTC, datetime
from decimal import Decimal

from django.db import migrations

EFFECTIVE_FROM = datetime(2025, 1, 1, tzinfo=UTC)

# provider, model, input, output, cache read, cache write (USD per million tokens)
PRICES = [
    ("openai", "gpt-4o", "2.50", "10.00", "1.25", "0"),
    ("openai", "gpt-4o-mini", "0.15", "0.60", "0.075", "0"),
    ("openai", "gpt-4.1", "2.00", "8.00", "0.50", "0"),
    ("openai", "gpt-4.1-mini", "0.40", "1.60", "0.10", "0"),
    ("openai", "gpt-4.1-nano", "0.10", "0.40", "0.025", "0"),
    ("openai", "o3", "2.00", "8.00", "0.50", "0"),
    ("openai", "o4-mini", "1.10", "4.40", "0.275", "0"),
    ("openai", "gpt-5", "1.25", "10.00", "0.125", "0"),
    ("openai", "gpt-5-mini", "0.25", "2.00", "0.025", "0"),
    ("openai", "gpt-5-nano", "0.05", "0.40", "0.005", "0"),
    ("anthropic", "claude-opus-4-1", "15.00", "75.00", "1.50", "18.75"),
    ("anthropic", "claude-opus-4-5", "5.00", "25.00", "0.50", "6.25"),
    ("anthropic", "claude-sonnet-4-5", "3.00", "15.00", "0.30", "3.75"),
    ("anthropic", "claude-sonnet-4-0", "3.00", "15.00", "0.30", "3.75"),
    ("anthropic", "claude-haiku-4-5", "1.00", "5.00", "0.10", "1.25"),
    ("anthropic", "claude-3-5-haiku-latest", "0.80", "4.00", "0.08", "1.00"),
]


def nanousd_per_mtok(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000_000)


def seed(apps, schema_editor):
    ModelPrice = apps.get_model("gateway", "ModelPrice")
    for provider, model, input_usd, output_usd, read_usd, write_usd in PRICES:
        ModelPrice.objects.get_or_create(
            provider=provider,
            model=model,
            effective_from=EFFECTIVE_FROM,
            defaults={
                "input_nanousd_per_mtok": nanousd_per_mtok(input_usd),
                "output_nanousd_per_mtok": nanousd_per_mtok(output_usd),
                "cache_read_nanousd_per_mtok": nanousd_per_mtok(read_usd),
                "cache_write_nanousd_per_mtok": nanousd_per_mtok(write_usd),
            },
        )


def unseed(apps, schema_editor):
    ModelPrice = apps.get_model("gateway", "ModelPrice")
    for provider, model, *_ in PRICES:
        ModelPrice.objects.filter(
            provider=provider, model=model, effective_from=EFFECTIVE_FROM
        ).delete()


class Migration(migrations.Migration):
    dependencies = [("gateway", "0001_initial")]

    operations = [migrations.RunPython(seed, unseed)]
