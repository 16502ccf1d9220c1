from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from credits.services import CreditsError, stripe_webhook_endpoint_configure


class Command(BaseCommand):
    help = (
        "Store STRIPE_WEBHOOK_SECRET for dj-stripe's signature check and print the webhook "
        "URL to register at Stripe. Makes no call to Stripe."
    )

    def handle(self, *args, **options):
        if not settings.STRIPE_WEBHOOK_SECRET:
            raise CommandError(
                "STRIPE_WEBHOOK_SECRET is not set; copy it from Stripe (whsec_...)."
            )
        try:
            url = stripe_webhook_endpoint_configure(
                secret=settings.STRIPE_WEBHOOK_SECRET,
                public_url=settings.PUBLIC_URL,
                uuid=settings.STRIPE_WEBHOOK_UUID,
            )
        except CreditsError as error:
            raise CommandError(str(error)) from error
        self.stdout.write(url)
