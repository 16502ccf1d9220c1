from django.core.management.base import BaseCommand
from django.db import transaction

from accounts.models import Account, User
from accounts.services import account_create
from credits.money import nanousd_from_cents
from credits.services import credit_grant
from gateway.models import AccessKey
from gateway.services import access_key_create

DEMO_EMAIL = "demo@tollbooth.local"
DEMO_SLUG = "demo"


class Command(BaseCommand):
    help = (
        "Create the demo user, account, a USD 1.00 promotional lot and an access key, once. "
        "Prints the key when it creates one."
    )

    def add_arguments(self, parser):
        parser.add_argument("--password", default="tollbooth-demo", help="Demo user's password.")

    @transaction.atomic
    def handle(self, *args, **options):
        user = User.objects.filter(email=DEMO_EMAIL).first()
        if user is None:
            user = User.objects.create_user(email=DEMO_EMAIL, password=options["password"])
        account = Account.objects.filter(slug=DEMO_SLUG).first()
        if account is not None:
            self.stderr.write("Demo account already seeded; its key was printed the first time.")
            return
        account = account_create(name="Demo team", owner=user, slug=DEMO_SLUG)
        credit_grant(
            account=account,
            amount_nanousd=nanousd_from_cents(100),
            reason="Demo credits",
            idempotency_key="demo-seed",
        )
        created = access_key_create(
            account=account,
            name="Demo key",
            scopes=[AccessKey.Scope.INFERENCE, AccessKey.Scope.MANAGEMENT],
            created_by=user,
        )
        self.stdout.write(created.raw_key)
