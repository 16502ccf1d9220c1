from django.apps import AppConfig


class CreditsConfig(AppConfig):
    name = "credits"
    verbose_name = "Credits"

    def ready(self) -> None:
        # Connects the dj-stripe webhook receivers.
        from credits import receivers  # noqa: F401
