from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import validate_email
from django.utils.text import slugify

from accounts.models import Account, User
from accounts.services import account_create


class Command(BaseCommand):
    help = "Create an account owned by the user with this email, creating the user if needed."

    def add_arguments(self, parser):
        parser.add_argument("--email", required=True, help="Owner's email address.")
        parser.add_argument("--name", required=True, help="Account name shown in the dashboard.")
        parser.add_argument(
            "--slug", help="URL-safe identifier; derived from the name if omitted."
        )
        parser.add_argument(
            "--password", help="Password for a new user; without it the user cannot sign in yet."
        )

    def handle(self, *args, **options):
        try:
            validate_email(options["email"])
        except ValidationError as error:
            raise CommandError(
                f"--email {options['email']!r} is not a valid email address."
            ) from error
        name = options["name"].strip()
        if not name:
            raise CommandError("--name must not be empty.")
        user = User.objects.filter(email__iexact=options["email"]).first()
        if user is None:
            user = User.objects.create_user(email=options["email"], password=options["password"])
            if not options["password"]:
                user.set_unusable_password()
                user.save(update_fields=["password"])
        # Rerunning the same command must not create a second account.
        slug = options["slug"] or slugify(name)
        if not slug:
            raise CommandError(f"--name {name!r} gives no URL-safe slug; pass --slug.")
        if Account.objects.filter(slug=slug).exists():
            raise CommandError(
                f"An account with slug {slug!r} already exists; pass --slug to choose another."
            )
        account = account_create(name=name, owner=user, slug=slug)
        self.stdout.write(f"Created account {account.slug} owned by {user.email}")
