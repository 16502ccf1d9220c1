from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from credits import api as credits_api
from credits.receivers import StripeWebhookView
from gateway import api as gateway_api
from gateway import proxy

api_patterns = [
    path("credits/checkout-session", credits_api.CheckoutSessionView.as_view()),
    path("credits/balance", credits_api.BalanceView.as_view()),
    path("credits/lots", credits_api.LotListView.as_view()),
    path("credits/transactions", credits_api.TransactionListView.as_view()),
    path("keys", gateway_api.AccessKeyListView.as_view()),
    path("keys/<int:key_id>", gateway_api.AccessKeyDetailView.as_view()),
    path("usage", gateway_api.UsageRecordListView.as_view()),
    path("usage/overview", gateway_api.UsageOverviewView.as_view()),
    path("prices", gateway_api.PriceListView.as_view()),
    path("providers/keys", gateway_api.ProviderKeyListView.as_view()),
    path("providers/keys/<str:provider>", gateway_api.ProviderKeyDetailView.as_view()),
    path("providers/custom", gateway_api.CustomProviderListView.as_view()),
    path("providers/custom/<int:provider_id>", gateway_api.CustomProviderDetailView.as_view()),
    path(
        "schema",
        SpectacularAPIView.as_view(permission_classes=[], authentication_classes=[]),
        name="api-schema",
    ),
    path(
        "docs",
        SpectacularSwaggerView.as_view(
            url_name="api-schema", permission_classes=[], authentication_classes=[]
        ),
        name="api-docs",
    ),
]

urlpatterns = [
    path("v1/chat/completions", proxy.chat_completions),
    path("v1/messages", proxy.messages),
    path("v1/models", proxy.models_list),
    path("api/", include(api_patterns)),
    path("admin/", admin.site.urls),
    path("accounts/", include("allauth.urls")),
    # Checks the signature before dj-stripe stores anything; dj-stripe's own route below
    # is shadowed by this one and stays for its URL names.
    path("stripe/webhook/<uuid:uuid>/", StripeWebhookView.as_view(), name="stripe-webhook"),
    path("stripe/", include("djstripe.urls", namespace="djstripe")),
    path("", include("portal.dashboard_urls")),
]
