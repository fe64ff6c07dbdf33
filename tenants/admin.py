"""Django admin for tenants and their keys; keys are created by command or service, never here."""
from django.contrib import admin, messages

from tenants.models import ApiKey, Tenant
from tenants.services import revoke_api_key


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    fields = ("prefix", "name", "status", "created_at", "expires_at", "revoked_at", "last_used_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = (
        "name", "is_active", "requests_per_minute", "tokens_per_minute",
        "max_concurrent_requests", "token_budget", "budget_period", "priority_tier", "created_at",
    )
    list_filter = ("is_active", "budget_period", "priority_tier")
    search_fields = ("name",)
    readonly_fields = ("created_at",)
    inlines = [ApiKeyInline]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "tenant", "name", "status", "created_at", "expires_at", "last_used_at")
    list_filter = ("tenant", "revoked_at")
    list_select_related = ("tenant",)
    search_fields = ("prefix", "name", "tenant__name")
    # The hash is shown read-only for support; prefix and tenant never change after creation.
    readonly_fields = (
        "tenant", "prefix", "hashed_key", "status", "created_at", "revoked_at", "last_used_at",
    )
    actions = ["revoke_selected"]

    def has_add_permission(self, request):
        return False

    @admin.display(description="status")
    def status(self, obj: ApiKey) -> str:
        return obj.status

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(self, request, queryset):
        count = 0
        for api_key in queryset.filter(revoked_at__isnull=True):
            revoke_api_key(api_key=api_key)
            count += 1
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)
