"""REST API authentication with access keys (`Authorization: Bearer tb_...`)."""

from rest_framework import authentication, exceptions, permissions

from accounts.models import Account
from gateway.services import KeyIdentity, access_key_authenticate


class AccessKeyAuthentication(authentication.BaseAuthentication):
    keyword = "bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw_key = header.partition(" ")
        if scheme.lower() != self.keyword or not raw_key.strip():
            raise exceptions.AuthenticationFailed(
                "Send the access key as `Authorization: Bearer tb_...`."
            )
        identity = access_key_authenticate(raw_key=raw_key.strip())
        if identity is None:
            raise exceptions.AuthenticationFailed(
                "Invalid access key: it is unknown, revoked or expired."
            )
        return (None, identity)

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'


class HasManagementScope(permissions.BasePermission):
    message = "This access key lacks the `management` scope needed for the REST API."

    def has_permission(self, request, view) -> bool:
        identity = request.auth
        if not isinstance(identity, KeyIdentity):
            raise exceptions.NotAuthenticated(
                "Missing access key: send `Authorization: Bearer tb_...`."
            )
        return identity.has_scope("management")


def request_account(request) -> Account:
    """Return the account of the key that authenticated the request."""
    identity: KeyIdentity = request.auth
    account = Account.objects.get(pk=identity.account_id)
    if account.is_frozen and request.method not in permissions.SAFE_METHODS:
        raise exceptions.PermissionDenied("This account is frozen; contact support.")
    return account
