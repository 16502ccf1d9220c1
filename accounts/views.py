"""Dashboard home: balance, lots, recent usage, a buy form and a quick-start snippet."""

from django.conf import settings
from django.shortcuts import render
from django.views import View

from accounts.mixins import AccountRequiredMixin, account_objects
from credits.forms import BuyCreditsForm
from credits.views import balance_context
from gateway.models import UsageRecord
from gateway.views import usage_rows

RECENT_USAGE = 10


class DashboardView(AccountRequiredMixin, View):
    def get(self, request):
        records = account_objects(UsageRecord, request.account).order_by("-created_at", "-id")
        context = {
            **balance_context(account=request.account),
            "usage": usage_rows(records[:RECENT_USAGE]),
            "form": BuyCreditsForm(),
            "PUBLIC_URL": settings.PUBLIC_URL,
        }
        return render(request, "accounts/dashboard.html", context)
