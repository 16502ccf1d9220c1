from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_datetime

from accounts.models import Account
from credits.money import format_usd, parse_usd
from credits.services import CreditsError, credit_grant


class Command(BaseCommand):
    help = "Grant a promotional credit lot to an account."

    def add_arguments(self, parser):
        parser.add_argument("--account", required=True, help="Account slug.")
        parser.add_argument("--amount-usd", required=True, help="Amount in USD, such as 10.00.")
        parser.add_argument("--reason", required=True, help="Why the credits are granted.")
        parser.add_argument(
            "--expires-at",
            help="When the lot expires, ISO 8601 with a time zone, such as "
            "2026-06-30T23:59:59Z. Defaults to one year from now.",
        )

    def handle(self, *args, **options):
        account = Account.objects.filter(slug=options["account"]).first()
        if account is None:
            raise CommandError(f"No account has the slug {options['account']!r}.")
        expires_at = None
        if options["expires_at"]:
            expires_at = parse_datetime(options["expires_at"].replace("Z", "+00:00"))
            if expires_at is None or expires_at.tzinfo is None:
                raise CommandError(
                    f"--expires-at {options['expires_at']!r} is not an ISO 8601 time with a "
                    "time zone, such as 2026-06-30T23:59:59Z."
                )
        try:
            amount = parse_usd(options["amount_usd"])
            lot = credit_grant(
                account=account,
                amount_nanousd=amount,
                reason=options["reason"],
                expires_at=expires_at,
            )
        except (ValueError, CreditsError) as error:
            raise CommandError(str(error)) from error
        self.stdout.write(
            f"Granted USD {format_usd(lot.original_nanousd)} to {account.slug} "
            f"(lot {lot.pk}, expires {lot.expires_at:%Y-%m-%d %H:%M:%S %Z})"
        )
