from django.core.management.base import BaseCommand, CommandError

from accounts.models import Account
from gateway.models import AccessKey
from gateway.services import AccessKeyError, access_key_create


class Command(BaseCommand):
    help = "Create an access key for an account and print it once."

    def add_arguments(self, parser):
        parser.add_argument("--account", required=True, help="Account slug.")
        parser.add_argument("--name", required=True, help="Name of the key.")
        parser.add_argument(
            "--scope",
            action="append",
            choices=AccessKey.Scope.values,
            help="Scope to grant; repeat for several. Default: inference and management.",
        )

    def handle(self, *args, **options):
        account = Account.objects.filter(slug=options["account"]).first()
        if account is None:
            raise CommandError(f"No account has the slug {options['account']!r}.")
        scopes = options["scope"] or [AccessKey.Scope.INFERENCE, AccessKey.Scope.MANAGEMENT]
        try:
            created = access_key_create(account=account, name=options["name"], scopes=scopes)
        except AccessKeyError as error:
            raise CommandError(str(error)) from error
        self.stderr.write(
            f"Created key {created.access_key.display} for {account.slug}; it is shown only once."
        )
        self.stdout.write(created.raw_key)
