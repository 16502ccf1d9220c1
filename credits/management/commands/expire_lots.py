from django.core.management.base import BaseCommand

from credits.services import credit_lots_expire_due


class Command(BaseCommand):
    help = "Write the expiry of every lot past its expiry date (the beat task does this too)."

    def handle(self, *args, **options):
        written = credit_lots_expire_due()
        self.stdout.write(f"Expired {written} lots")
