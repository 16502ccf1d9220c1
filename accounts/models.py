from django.contrib.auth.models import AbstractUser, BaseUserManager
from django.db import models


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    def _create_user(self, email: str, password: str | None, **extra_fields) -> "User":
        if not email:
            raise ValueError("An email address is required.")
        user = self.model(email=self.normalize_email(email), **extra_fields)
        user.set_password(password)
        user.save(using=self._db)
        return user

    def create_user(self, email: str, password: str | None = None, **extra_fields) -> "User":
        extra_fields.setdefault("is_staff", False)
        extra_fields.setdefault("is_superuser", False)
        return self._create_user(email, password, **extra_fields)

    def create_superuser(self, email: str, password: str | None = None, **extra_fields) -> "User":
        extra_fields.setdefault("is_staff", True)
        extra_fields.setdefault("is_superuser", True)
        return self._create_user(email, password, **extra_fields)


class User(AbstractUser):
    """A person who signs in with an email address; there is no username."""

    username = None  # type: ignore[assignment]
    email = models.EmailField("email address", unique=True)

    objects = UserManager()  # type: ignore[misc]

    USERNAME_FIELD = "email"
    REQUIRED_FIELDS: list[str] = []

    def __str__(self) -> str:
        return self.email


class Account(models.Model):
    """A tenant: credits, keys, providers and usage all belong to one account."""

    name = models.CharField(max_length=120)
    slug = models.SlugField(max_length=80, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    is_frozen = models.BooleanField(
        default=False, help_text="A frozen account cannot call the gateway or buy credits."
    )
    # Debt from requests that overshot the balance; paid first out of the next lot.
    debt_nanousd = models.BigIntegerField(default=0)
    # Owners and admins get an email when the balance drops below this; NULL turns it off.
    low_balance_threshold_nanousd = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="Email owners and admins when the balance drops below this (nano-dollars).",
    )
    # When the low-balance email went out; NULL means armed. Cleared (re-armed) once the
    # balance is back at or above the threshold, so each drop below it sends one email.
    low_balance_alerted_at = models.DateTimeField(null=True, blank=True)
    members = models.ManyToManyField(User, through="Membership", related_name="accounts")

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(debt_nanousd__gte=0), name="account_debt_not_negative"
            ),
            models.CheckConstraint(
                condition=models.Q(low_balance_threshold_nanousd__gte=0),
                name="account_low_balance_threshold_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.slug})"

    def low_balance_alert_due(self, *, balance_nanousd: int) -> bool:
        """Tell whether the low-balance alert state disagrees with `balance_nanousd`.

        True when the alert is armed and the balance is below the threshold (send it), or
        when it went out and the balance is back at or above the threshold (re-arm it).
        Reads only this row's fields, so the ledger can ask after every write for free.
        """
        threshold = self.low_balance_threshold_nanousd
        if threshold is None:
            return False
        if self.low_balance_alerted_at is None:
            return balance_nanousd < threshold
        return balance_nanousd >= threshold


class Membership(models.Model):
    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        ADMIN = "admin", "Admin"
        MEMBER = "member", "Member"

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["account", "created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["account", "user"], name="membership_unique_user"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.account} as {self.role}"
