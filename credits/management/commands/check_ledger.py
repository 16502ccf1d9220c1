from django.core.management.base import BaseCommand, CommandError

from accounts.models import Account
from credits.services import ledger_violations


class Command(BaseCommand):
    help = "Verify the ledger invariants of every account; exit non-zero on a violation."

    def add_arguments(self, parser):
        parser.add_argument("--account", help="Check only the account with this slug.")

    def handle(self, *args, **options):
        accounts = Account.objects.order_by("id")
        if options["account"]:
            accounts = accounts.filter(slug=options["account"])
            if not accounts.exists():
                raise CommandError(f"No account has the slug {options['account']!r}.")
        checked = 0
        violations: list[str] = []
        for account in accounts.iterator():
            violations.extend(ledger_violations(account=account))
            checked += 1
        for violation in violations:
            self.stderr.write(violation)
        if violations:
            raise CommandError(f"{len(violations)} ledger violations in {checked} accounts.")
        noun = "account" if checked == 1 else "accounts"
        self.stdout.write(f"Ledger sound: {checked} {noun} checked")
