"""Django admin: tenants and keys (every change audited), usage and the audit log (read-only).

Keys are created by command or service, never here.
"""
from django.contrib import admin, messages

from tenants.audit import deleted, form_changes, record_audit
from tenants.models import ApiKey, AuditLog, DailyUsage, Tenant, UsageEvent
from tenants.services import revoke_api_key


class AuditedAdmin(admin.ModelAdmin):
    """Writes an audit entry (the admin user, the changed fields) for each save and delete."""

    audit_name: str  # the first half of the action, e.g. "tenant" in "tenant.update"

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        changes = form_changes(form, is_new=not change)
        if changes:
            action = f"{self.audit_name}.{'update' if change else 'create'}"
            record_audit(actor=request.user, action=action, target=obj, changes=changes)

    def delete_model(self, request, obj):
        self._audit_delete(request, obj)
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            self._audit_delete(request, obj)
        super().delete_queryset(request, queryset)

    def _audit_delete(self, request, obj):
        record_audit(
            actor=request.user, action=f"{self.audit_name}.delete", target=obj,
            changes=deleted(obj),
        )


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records written by the service itself: to look at, never to edit."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


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
class TenantAdmin(AuditedAdmin):
    audit_name = "tenant"
    list_display = (
        "name", "is_active", "requests_per_minute", "tokens_per_minute",
        "max_concurrent_requests", "token_budget", "budget_period", "priority_tier", "created_at",
    )
    list_filter = ("is_active", "budget_period", "priority_tier")
    search_fields = ("name",)
    readonly_fields = ("created_at",)
    inlines = [ApiKeyInline]


@admin.register(ApiKey)
class ApiKeyAdmin(AuditedAdmin):
    audit_name = "api_key"
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
            revoke_api_key(api_key=api_key, actor=request.user)
            count += 1
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)


@admin.register(UsageEvent)
class UsageEventAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at", "tenant", "api_key", "model", "endpoint", "status", "prompt_tokens",
        "completion_tokens", "cached_tokens", "latency_ms", "ttft_ms",
    )
    list_filter = ("status", "endpoint", "tenant")
    list_select_related = ("tenant", "api_key")
    search_fields = ("request_id", "model", "tenant__name")
    date_hierarchy = "created_at"


@admin.register(DailyUsage)
class DailyUsageAdmin(ReadOnlyAdmin):
    list_display = (
        "day", "tenant", "model", "requests", "errors", "prompt_tokens", "completion_tokens",
    )
    list_filter = ("tenant", "model")
    list_select_related = ("tenant",)
    date_hierarchy = "day"


@admin.register(AuditLog)
class AuditLogAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "actor_label", "action", "tenant", "target")
    list_filter = ("action",)
    search_fields = ("target", "actor_label", "tenant__name")
    list_select_related = ("tenant",)
    date_hierarchy = "created_at"
