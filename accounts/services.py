"""Account and membership operations; views, commands and the signup adapter call these."""

from django.db import transaction
from django.utils.text import slugify

from accounts.models import Account, Membership, User


def _unique_slug(name: str) -> str:
    base = slugify(name)[:60] or "account"
    slug = base
    suffix = 2
    while Account.objects.filter(slug=slug).exists():
        slug = f"{base}-{suffix}"
        suffix += 1
    return slug


@transaction.atomic
def account_create(*, name: str, owner: User, slug: str | None = None) -> Account:
    """Create an account with `owner` as its owner member."""
    account = Account.objects.create(name=name, slug=slug or _unique_slug(name))
    Membership.objects.create(account=account, user=owner, role=Membership.Role.OWNER)
    return account


@transaction.atomic
def account_create_personal(*, user: User) -> Account:
    """Create the personal account a new user gets at signup."""
    local_part = user.email.split("@", 1)[0]
    return account_create(name=f"{local_part}'s account", owner=user)


def account_for_user(*, user: User, account_id: int | None = None) -> Account | None:
    """Return the account the user works in: the one chosen, else their oldest membership."""
    memberships = Membership.objects.filter(user=user).select_related("account")
    if account_id is not None:
        chosen = memberships.filter(account_id=account_id).first()
        if chosen is not None:
            return chosen.account
    first = memberships.order_by("created_at", "id").first()
    return first.account if first else None
