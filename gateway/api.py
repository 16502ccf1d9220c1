from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from credits.money import format_usd
from gateway.authentication import request_account
from gateway.models import AccessKey, UsageRecord
from gateway.services import AccessKeyError, access_key_create, access_key_revoke


class AccessKeySerializer(serializers.ModelSerializer):
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
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
        ]


class AccessKeyCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=120)
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=AccessKey.Scope.choices),
        allow_empty=False,
        default=[AccessKey.Scope.INFERENCE],
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


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
