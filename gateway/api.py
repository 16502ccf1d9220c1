from django.http import Http404
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from credits.money import format_usd, parse_usd
from gateway.authentication import request_account
from gateway.models import AccessKey, CustomProvider, ProviderCredential, UsageRecord
from gateway.providers import (
    BUILTIN_PROVIDER_NAMES,
    ProviderError,
    custom_provider_create,
    custom_provider_delete,
    custom_provider_update,
    provider_credential_delete,
    provider_credential_set,
)
from gateway.services import (
    REQUESTS_PER_MINUTE_MAX,
    AccessKeyError,
    access_key_create,
    access_key_revoke,
)


class AccessKeySerializer(serializers.ModelSerializer):
    spend_limit_usd = serializers.SerializerMethodField()

    class Meta:
        model = AccessKey
        fields = [
            "id",
            "name",
            "prefix",
            "last_four",
            "scopes",
            "allowed_providers",
            "allowed_models",
            "spend_limit_usd",
            "spend_limit_nanousd",
            "spend_limit_period",
            "requests_per_minute",
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
        ]

    def get_spend_limit_usd(self, access_key: AccessKey) -> str | None:
        if access_key.spend_limit_nanousd is None:
            return None
        return format_usd(access_key.spend_limit_nanousd)


class AccessKeyCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=120)
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=AccessKey.Scope.choices),
        allow_empty=False,
        default=[AccessKey.Scope.INFERENCE],
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    spend_limit_usd = serializers.CharField(
        required=False,
        allow_null=True,
        help_text='Spend limit in USD, such as "25.00"; requests are refused once reached.',
    )
    spend_limit_period = serializers.ChoiceField(
        choices=AccessKey.SpendLimitPeriod.choices,
        default=AccessKey.SpendLimitPeriod.NEVER,
        help_text="When the spend limit resets: UTC day, ISO week, calendar month, or never.",
    )
    requests_per_minute = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=REQUESTS_PER_MINUTE_MAX
    )

    def validate_spend_limit_usd(self, value: str | None) -> int | None:
        """Return the limit in nano-dollars."""
        if value is None:
            return None
        try:
            return parse_usd(value)
        except ValueError as error:
            raise serializers.ValidationError(str(error)) from error

    def validate(self, attrs: dict) -> dict:
        if "spend_limit_usd" in attrs:
            attrs["spend_limit_nanousd"] = attrs.pop("spend_limit_usd")
        return attrs


class AccessKeyCreatedSerializer(AccessKeySerializer):
    key = serializers.CharField(help_text="The key itself; shown only in this response.")

    class Meta(AccessKeySerializer.Meta):
        fields = [*AccessKeySerializer.Meta.fields, "key"]


class AccessKeyListView(APIView):
    @extend_schema(responses=AccessKeySerializer(many=True), summary="List access keys")
    def get(self, request):
        account = request_account(request)
        keys = AccessKey.objects.for_account(account)
        return Response(AccessKeySerializer(keys, many=True).data)

    @extend_schema(
        request=AccessKeyCreateSerializer,
        responses={201: AccessKeyCreatedSerializer},
        summary="Create an access key; the key is returned once",
    )
    def post(self, request):
        account = request_account(request)
        serializer = AccessKeyCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            created = access_key_create(account=account, **serializer.validated_data)
        except AccessKeyError as error:
            raise serializers.ValidationError({"non_field_errors": [str(error)]}) from error
        data = AccessKeySerializer(created.access_key).data
        return Response({**data, "key": created.raw_key}, status=status.HTTP_201_CREATED)


class AccessKeyDetailView(APIView):
    def _get(self, request, key_id: int) -> AccessKey:
        return get_object_or_404(
            AccessKey.objects.for_account(request_account(request)), pk=key_id
        )

    @extend_schema(responses=AccessKeySerializer, summary="Show an access key")
    def get(self, request, key_id: int):
        return Response(AccessKeySerializer(self._get(request, key_id)).data)

    @extend_schema(responses=AccessKeySerializer, summary="Revoke an access key")
    def delete(self, request, key_id: int):
        access_key = access_key_revoke(access_key=self._get(request, key_id))
        return Response(AccessKeySerializer(access_key).data)


class UsageRecordSerializer(serializers.ModelSerializer):
    cost_usd = serializers.SerializerMethodField()
    fee_usd = serializers.SerializerMethodField()
    model_cost_usd = serializers.SerializerMethodField()

    class Meta:
        model = UsageRecord
        fields = [
            "request_id",
            "attempt",
            "provider",
            "model",
            "surface",
            "key_source",
            "status",
            "http_status",
            "streamed",
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
            "usage_estimated",
            "fee_usd",
            "model_cost_usd",
            "cost_usd",
            "cost_nanousd",
            "latency_ms",
            "created_at",
        ]

    def get_cost_usd(self, record: UsageRecord) -> str:
        return format_usd(record.cost_nanousd)

    def get_fee_usd(self, record: UsageRecord) -> str:
        return format_usd(record.fee_nanousd)

    def get_model_cost_usd(self, record: UsageRecord) -> str:
        return format_usd(record.model_cost_nanousd)


class UsageRecordListView(generics.ListAPIView):
    serializer_class = UsageRecordSerializer

    def get_queryset(self):
        return UsageRecord.objects.filter(account=request_account(self.request))


# Providers: the account's own keys for the built-in providers, and custom providers.
# Keys are write-only: responses show only their last four characters and when they were set.


def _provider_error(error: ProviderError) -> serializers.ValidationError:
    return serializers.ValidationError({error.field or "non_field_errors": [str(error)]})


class ProviderCredentialSerializer(serializers.ModelSerializer):
    class Meta:
        model = ProviderCredential
        fields = ["provider", "last_four", "set_at", "created_at"]


class ProviderKeySetSerializer(serializers.Serializer):
    api_key = serializers.CharField(
        write_only=True, max_length=4096, help_text="The provider's API key; never returned."
    )


class CustomProviderSerializer(serializers.ModelSerializer):
    models = serializers.ListField(
        source="model_names", child=serializers.CharField(), help_text="Model names it serves."
    )
    has_key = serializers.BooleanField(read_only=True)
    key_last_four = serializers.SerializerMethodField()

    class Meta:
        model = CustomProvider
        fields = [
            "id",
            "name",
            "base_url",
            "api_format",
            "models",
            "has_key",
            "key_last_four",
            "key_set_at",
            "created_at",
            "updated_at",
        ]

    def get_key_last_four(self, provider: CustomProvider) -> str | None:
        return provider.key_last_four if provider.has_key else None


class CustomProviderCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=40, help_text="Slug; models are called `name:model`.")
    base_url = serializers.CharField(max_length=500)
    api_format = serializers.ChoiceField(choices=CustomProvider.ApiFormat.choices)
    api_key = serializers.CharField(
        required=False, allow_blank=True, write_only=True, max_length=4096
    )
    models = serializers.ListField(
        child=serializers.CharField(max_length=120), required=False, default=list, max_length=200
    )


class CustomProviderUpdateSerializer(serializers.Serializer):
    name = serializers.CharField(required=False, max_length=40)
    base_url = serializers.CharField(required=False, max_length=500)
    api_format = serializers.ChoiceField(required=False, choices=CustomProvider.ApiFormat.choices)
    api_key = serializers.CharField(
        required=False,
        allow_null=True,
        write_only=True,
        max_length=4096,
        help_text="A new key replaces the stored one; null removes it.",
    )
    models = serializers.ListField(
        child=serializers.CharField(max_length=120), required=False, max_length=200
    )


class ProviderKeyListView(APIView):
    @extend_schema(
        responses=ProviderCredentialSerializer(many=True), summary="List the account's own keys"
    )
    def get(self, request):
        credentials = ProviderCredential.objects.for_account(request_account(request))
        return Response(ProviderCredentialSerializer(credentials, many=True).data)


class ProviderKeyDetailView(APIView):
    def _get(self, request, provider: str) -> ProviderCredential:
        return get_object_or_404(
            ProviderCredential.objects.for_account(request_account(request)), provider=provider
        )

    @extend_schema(responses=ProviderCredentialSerializer, summary="Show the account's own key")
    def get(self, request, provider: str):
        return Response(ProviderCredentialSerializer(self._get(request, provider)).data)

    @extend_schema(
        request=ProviderKeySetSerializer,
        responses=ProviderCredentialSerializer,
        summary="Set or replace the account's own key for `openai` or `anthropic`",
    )
    def put(self, request, provider: str):
        account = request_account(request)
        if provider not in BUILTIN_PROVIDER_NAMES:
            raise Http404
        serializer = ProviderKeySetSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            credential = provider_credential_set(
                account=account, provider=provider, api_key=serializer.validated_data["api_key"]
            )
        except ProviderError as error:
            raise _provider_error(error) from error
        return Response(ProviderCredentialSerializer(credential).data)

    @extend_schema(responses={204: None}, summary="Delete the account's own key")
    def delete(self, request, provider: str):
        provider_credential_delete(credential=self._get(request, provider))
        return Response(status=status.HTTP_204_NO_CONTENT)


class CustomProviderListView(APIView):
    @extend_schema(responses=CustomProviderSerializer(many=True), summary="List custom providers")
    def get(self, request):
        providers = CustomProvider.objects.for_account(request_account(request))
        return Response(CustomProviderSerializer(providers, many=True).data)

    @extend_schema(
        request=CustomProviderCreateSerializer,
        responses={201: CustomProviderSerializer},
        summary="Add a custom provider",
    )
    def post(self, request):
        account = request_account(request)
        serializer = CustomProviderCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            provider = custom_provider_create(
                account=account,
                name=data["name"],
                base_url=data["base_url"],
                api_format=data["api_format"],
                api_key=data.get("api_key") or None,
                model_names=data["models"],
            )
        except ProviderError as error:
            raise _provider_error(error) from error
        return Response(CustomProviderSerializer(provider).data, status=status.HTTP_201_CREATED)


class CustomProviderDetailView(APIView):
    def _get(self, request, provider_id: int) -> CustomProvider:
        return get_object_or_404(
            CustomProvider.objects.for_account(request_account(request)), pk=provider_id
        )

    @extend_schema(responses=CustomProviderSerializer, summary="Show a custom provider")
    def get(self, request, provider_id: int):
        return Response(CustomProviderSerializer(self._get(request, provider_id)).data)

    @extend_schema(
        request=CustomProviderUpdateSerializer,
        responses=CustomProviderSerializer,
        summary="Change a custom provider",
    )
    def patch(self, request, provider_id: int):
        provider = self._get(request, provider_id)
        serializer = CustomProviderUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        key_given = "api_key" in data
        try:
            provider = custom_provider_update(
                provider=provider,
                name=data.get("name"),
                base_url=data.get("base_url"),
                api_format=data.get("api_format"),
                model_names=data.get("models"),
                api_key=data["api_key"] if key_given else None,
                key_clear=key_given and data["api_key"] is None,
            )
        except ProviderError as error:
            raise _provider_error(error) from error
        return Response(CustomProviderSerializer(provider).data)

    @extend_schema(responses={204: None}, summary="Delete a custom provider")
    def delete(self, request, provider_id: int):
        custom_provider_delete(provider=self._get(request, provider_id))
        return Response(status=status.HTTP_204_NO_CONTENT)
