from datetime import UTC, date, datetime, time, timedelta

from django.http import Http404
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from credits.money import format_usd, parse_usd
from gateway.authentication import request_account
from gateway.models import (
    AccessKey,
    CustomProvider,
    ProviderCredential,
    UsageRecord,
    UsageRollup,
)
from gateway.providers import (
    BUILTIN_PROVIDER_NAMES,
    ProviderError,
    custom_provider_create,
    custom_provider_delete,
    custom_provider_update,
    provider_credential_delete,
    provider_credential_set,
)
from gateway.rollups import OVERVIEW_MAX_DAYS, usage_overview
from gateway.routing import price_list
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
    key_id = serializers.IntegerField(
        source="access_key_id", read_only=True, allow_null=True, help_text="The access key's id."
    )
    cost_usd = serializers.SerializerMethodField()
    fee_usd = serializers.SerializerMethodField()
    model_cost_usd = serializers.SerializerMethodField()

    class Meta:
        model = UsageRecord
        fields = [
            "request_id",
            "attempt",
            "key_id",
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


class UsageRecordQuerySerializer(serializers.Serializer):
    key = serializers.IntegerField(
        required=False, min_value=1, help_text="Only the records of this access key (its id)."
    )
    status = serializers.ChoiceField(
        choices=UsageRecord.Status.choices,
        required=False,
        help_text="Only records with this status.",
    )
    provider = serializers.CharField(required=False, help_text="Only this provider's records.")
    model = serializers.CharField(
        required=False, help_text="Only records of this model, as named upstream."
    )
    since = serializers.DateTimeField(
        required=False, help_text="Only records created at or after this ISO 8601 time."
    )
    until = serializers.DateTimeField(
        required=False, help_text="Only records created before this ISO 8601 time."
    )

    def validate(self, attrs: dict) -> dict:
        since, until = attrs.get("since"), attrs.get("until")
        if since is not None and until is not None and since >= until:
            raise serializers.ValidationError({"until": ["until must be later than since."]})
        return attrs


class UsageRecordListView(generics.ListAPIView):
    """Usage records, newest first, one per upstream attempt."""

    serializer_class = UsageRecordSerializer

    @extend_schema(parameters=[UsageRecordQuerySerializer], summary="List usage records")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        query = UsageRecordQuerySerializer(data=self.request.query_params)
        query.is_valid(raise_exception=True)
        filters = query.validated_data
        records = UsageRecord.objects.filter(account=request_account(self.request))
        if "key" in filters:
            records = records.filter(access_key_id=filters["key"])
        for name in ("status", "provider", "model"):
            if name in filters:
                records = records.filter(**{name: filters[name]})
        if "since" in filters:
            records = records.filter(created_at__gte=filters["since"])
        if "until" in filters:
            records = records.filter(created_at__lt=filters["until"])
        return records


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


class ModelPriceSerializer(serializers.Serializer):
    id = serializers.CharField(help_text="The name to call the model by: `provider:model`.")
    provider = serializers.CharField()
    model = serializers.CharField()
    input_usd_per_mtok = serializers.CharField()
    output_usd_per_mtok = serializers.CharField()
    cache_read_usd_per_mtok = serializers.CharField()
    cache_write_usd_per_mtok = serializers.CharField()
    effective_from = serializers.DateTimeField(help_text="Since when this price applies.")


class PriceListSerializer(serializers.Serializer):
    fee_usd_per_mtok = serializers.CharField(
        help_text="The processing fee per million tokens, input plus output, on every request."
    )
    models = ModelPriceSerializer(many=True)


class PriceListView(APIView):
    @extend_schema(responses=PriceListSerializer, summary="Built-in inference prices")
    def get(self, request):
        """Return the processing fee and the model prices that built-in inference charges.

        Requests on the account's own keys or custom providers pay only the fee.
        """
        return Response(PriceListSerializer(price_list(at=timezone.now())).data)


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


# Usage overview: usage summed per UTC hour or day, read from usage rollups.

OVERVIEW_DEFAULT_DAYS = {UsageRollup.Period.DAY: 30, UsageRollup.Period.HOUR: 2}
OVERVIEW_GROUPS = [
    ("model", "Provider and model"),
    ("key", "Access key"),
    ("provider", "Provider"),
]


class UsageOverviewQuerySerializer(serializers.Serializer):
    period = serializers.ChoiceField(
        choices=UsageRollup.Period.choices,
        default=UsageRollup.Period.DAY,
        help_text="Window of each series entry: UTC `day` or `hour`.",
    )
    start = serializers.DateField(
        required=False,
        input_formats=["%Y-%m-%d"],
        help_text="First UTC day, YYYY-MM-DD. Defaults to 29 days before `end` for `day` "
        "and the day before `end` for `hour`.",
    )
    end = serializers.DateField(
        required=False,
        input_formats=["%Y-%m-%d"],
        help_text="Last UTC day, included, YYYY-MM-DD. Defaults to today (UTC). At most "
        f"{OVERVIEW_MAX_DAYS[UsageRollup.Period.DAY]} days for `day` and "
        f"{OVERVIEW_MAX_DAYS[UsageRollup.Period.HOUR]} for `hour`.",
    )
    group_by = serializers.ChoiceField(
        choices=OVERVIEW_GROUPS,
        required=False,
        help_text="Also split the sums by `model`, `key` or `provider`.",
    )
    key = serializers.IntegerField(
        required=False, min_value=1, help_text="Only the usage of this access key (its id)."
    )

    def validate(self, attrs: dict) -> dict:
        period = attrs["period"]
        end = attrs.get("end") or timezone.now().astimezone(UTC).date()
        start = attrs.get("start") or end - timedelta(days=OVERVIEW_DEFAULT_DAYS[period] - 1)
        if start > end:
            raise serializers.ValidationError(
                {"start": [f"start ({start}) is after end ({end})."]}
            )
        days = (end - start).days + 1
        if days > OVERVIEW_MAX_DAYS[period]:
            raise serializers.ValidationError(
                {
                    "end": [
                        f"The range covers {days} days, more than the "
                        f"{OVERVIEW_MAX_DAYS[period]} allowed for period={period}."
                    ]
                }
            )
        return {**attrs, "start": start, "end": end}


class UsageTotalsSerializer(serializers.Serializer):
    request_count = serializers.IntegerField(
        help_text="Upstream attempts; a request that fell back counts once per attempt."
    )
    succeeded_count = serializers.IntegerField()
    failed_count = serializers.IntegerField(
        help_text="Upstream errors and failures; streams the client aborted count as neither."
    )
    estimated_count = serializers.IntegerField(
        help_text="Attempts whose tokens were estimated because upstream sent no usage."
    )
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    cache_read_tokens = serializers.IntegerField()
    cache_write_tokens = serializers.IntegerField()
    reasoning_tokens = serializers.IntegerField()
    fee_usd = serializers.SerializerMethodField()
    fee_nanousd = serializers.IntegerField()
    model_cost_usd = serializers.SerializerMethodField()
    model_cost_nanousd = serializers.IntegerField()
    cost_usd = serializers.SerializerMethodField()
    cost_nanousd = serializers.IntegerField()

    def get_fee_usd(self, totals: dict) -> str:
        return format_usd(totals["fee_nanousd"])

    def get_model_cost_usd(self, totals: dict) -> str:
        return format_usd(totals["model_cost_nanousd"])

    def get_cost_usd(self, totals: dict) -> str:
        return format_usd(totals["cost_nanousd"])


class UsageGroupSerializer(serializers.Serializer):
    group = serializers.CharField(
        help_text='"provider:model", "provider", or the key id ("none" for no key).'
    )
    label = serializers.CharField()
    provider = serializers.CharField(allow_null=True)
    model = serializers.CharField(allow_null=True)
    access_key_id = serializers.IntegerField(allow_null=True)
    access_key_name = serializers.CharField(allow_null=True)
    totals = UsageTotalsSerializer()


class UsageWindowSerializer(serializers.Serializer):
    window_start = serializers.DateTimeField(default_timezone=UTC)
    window_end = serializers.DateTimeField(default_timezone=UTC)
    totals = UsageTotalsSerializer()
    groups = UsageGroupSerializer(many=True)


class UsageOverviewSerializer(serializers.Serializer):
    period = serializers.CharField()
    start = serializers.DateTimeField(default_timezone=UTC, help_text="Start of the range.")
    end = serializers.DateTimeField(
        default_timezone=UTC, help_text="End of the range, excluded (midnight after `end`)."
    )
    complete_until = serializers.DateTimeField(
        default_timezone=UTC,
        help_text="The sums hold every request before this time. Later windows (the one "
        "open now, and closed ones not rolled up yet, usually for up to five minutes) are "
        "left out of `totals` and `series`.",
    )
    group_by = serializers.CharField(allow_null=True)
    key = serializers.IntegerField(source="access_key_id", allow_null=True)
    totals = UsageTotalsSerializer()
    groups = UsageGroupSerializer(many=True, help_text="Sums per group, highest cost first.")
    series = UsageWindowSerializer(
        many=True, help_text="One entry per window up to `complete_until`, zeros included."
    )


def _utc_midnight(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


class UsageOverviewView(APIView):
    @extend_schema(
        parameters=[UsageOverviewQuerySerializer],
        responses=UsageOverviewSerializer,
        summary="Usage and spend per UTC day or hour, in total and per model, key or provider",
        description="Read from usage rollups, which are written a few minutes after each "
        "hour and day closes; `complete_until` says how far they reach. Money is a USD "
        "string with nine places next to integer nano-dollars.",
    )
    def get(self, request):
        account = request_account(request)
        query = UsageOverviewQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        params = query.validated_data
        access_key = None
        if "key" in params:
            access_key = get_object_or_404(
                AccessKey.objects.for_account(account), pk=params["key"]
            )
        overview = usage_overview(
            account=account,
            period=params["period"],
            start=_utc_midnight(params["start"]),
            end=_utc_midnight(params["end"] + timedelta(days=1)),
            at=timezone.now(),
            group_by=params.get("group_by"),
            access_key=access_key,
        )
        return Response(UsageOverviewSerializer(overview).data)
