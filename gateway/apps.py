from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway"

    def ready(self) -> None:
        # Registers the access key scheme with drf-spectacular.
        from gateway import schema  # noqa: F401
