from allauth.account.apps import AccountConfig
from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts"


class SignInConfig(AccountConfig):
    """django-allauth's account app, named apart from Tollbooth's accounts in the admin."""

    verbose_name = "Sign-in email addresses"
