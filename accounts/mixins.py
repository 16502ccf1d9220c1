"""Tenant scoping for dashboard views: every page works inside the signed-in user's account."""

from django.contrib.auth.mixins import LoginRequiredMixin
from django.db import models
from django.http import Http404

from accounts.context_processors import CURRENT_ACCOUNT_SESSION_KEY
from accounts.models import Account
from accounts.services import account_for_user


def account_objects(model: type[models.Model], account: Account) -> models.QuerySet:
    """Return the rows of `model` that belong to `account`.

    Uses the model's `for_account` queryset method where it has one, so a lookup through
    this queryset finds nothing for another account's row and the view returns 404.
    """
    manager = model._default_manager
    if hasattr(manager, "for_account"):
        return manager.for_account(account)
    return manager.filter(account=account)


class AccountRequiredMixin(LoginRequiredMixin):
    """Require a signed-in user and set `request.account` to the account they work in.

    Anonymous users are redirected to the login page. A user without any membership
    gets 404, because there is no account whose pages could be shown.
    """

    def dispatch(self, request, *args, **kwargs):
        if not request.user.is_authenticated:
            return self.handle_no_permission()
        account = account_for_user(
            user=request.user, account_id=request.session.get(CURRENT_ACCOUNT_SESSION_KEY)
        )
        if account is None:
            raise Http404("This user is not a member of any account.")
        request.account = account
        return super().dispatch(request, *args, **kwargs)
