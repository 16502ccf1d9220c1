"""Browser dashboard routes; portal/urls.py includes them at the site root."""

from django.urls import path

from accounts.views import DashboardView
from credits.views import CheckoutSuccessView, CheckoutView, CreditsView
from gateway.views import (
    CustomProviderCreateView,
    CustomProviderDeleteView,
    CustomProviderEditView,
    KeyCreateView,
    KeyRevokeView,
    KeysView,
    ProviderKeyDeleteView,
    ProviderKeySetView,
    ProvidersView,
    UsageView,
)

urlpatterns = [
    path("", DashboardView.as_view(), name="dashboard"),
    path("credits/", CreditsView.as_view(), name="credits"),
    path("credits/checkout/", CheckoutView.as_view(), name="credits-checkout"),
    path("credits/success/", CheckoutSuccessView.as_view(), name="credits-success"),
    path("keys/", KeysView.as_view(), name="keys"),
    path("keys/create/", KeyCreateView.as_view(), name="key-create"),
    path("keys/<int:key_id>/revoke/", KeyRevokeView.as_view(), name="key-revoke"),
    path("usage/", UsageView.as_view(), name="usage"),
    path("providers/", ProvidersView.as_view(), name="providers"),
    path("providers/keys/<str:provider>/", ProviderKeySetView.as_view(), name="provider-key-set"),
    path(
        "providers/keys/<str:provider>/delete/",
        ProviderKeyDeleteView.as_view(),
        name="provider-key-delete",
    ),
    path("providers/custom/", CustomProviderCreateView.as_view(), name="custom-provider-create"),
    path(
        "providers/custom/<int:provider_id>/",
        CustomProviderEditView.as_view(),
        name="custom-provider-edit",
    ),
    path(
        "providers/custom/<int:provider_id>/delete/",
        CustomProviderDeleteView.as_view(),
        name="custom-provider-delete",
    ),
]
