"""OpenAPI description of access key authentication, so API docs can send a key."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class AccessKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "gateway.authentication.AccessKeyAuthentication"
    name = "accessKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An access key with the `management` scope: `tb_...`.",
        }
