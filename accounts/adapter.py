from allauth.account.adapter import DefaultAccountAdapter

from accounts.services import account_create_personal


class AccountAdapter(DefaultAccountAdapter):
    """Give every new user a personal account they own."""

    def save_user(self, request, user, form, commit=True):
        user = super().save_user(request, user, form, commit=commit)
        if commit:
            account_create_personal(user=user)
        return user
