"""Django admin: tenants and keys (every change audited), LoRA adapters (registered and removed through
their services), usage and the audit log (read-only).

Keys are created by command or service, never here.
"""
from django import forms
from django.contrib import admin, messages

from tenants.audit import deleted, form_changes, record_audit
from tenants.errors import LoRAAdapterRefused
from tenants.lora_services import check_lora_adapter, register_lora_adapter, remove_lora_adapter
from tenants.models import ApiKey, AuditLog, DailyUsage, LoRAAdapter, Tenant, UsageEvent
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


class LoRAAdapterAddForm(forms.ModelForm):
    """Checks the adapter as registration will (its folder, rank and name), so a refusal shows on the form."""

    class Meta:
        model = LoRAAdapter
        fields = ("tenant", "name", "base_model", "path")

    def clean(self):
        data = super().clean()
        if not self.errors:
            try:
                check_lora_adapter(name=data["name"], base_model=data["base_model"], path=data["path"])
            except LoRAAdapterRefused as error:
                raise forms.ValidationError(str(error)) from None
        return data


@admin.register(LoRAAdapter)
class LoRAAdapterAdmin(admin.ModelAdmin):
    list_display = ("name", "tenant", "base_model", "rank", "alpha", "created_at", "disabled_at")
    list_filter = ("tenant", "base_model")
    list_select_related = ("tenant",)
    search_fields = ("name", "base_model", "tenant__name")
    actions = ["remove_selected"]

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = LoRAAdapterAddForm
        return super().get_form(request, obj, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        """Registered adapters are read-only: a change is a removal and a new registration."""
        return () if obj is None else ("tenant", "name", "base_model", "path", "rank", "alpha", "created_at",
                                       "disabled_at")

    def save_model(self, request, obj, form, change):
        if not change:
            adapter = register_lora_adapter(tenant=obj.tenant, name=obj.name, base_model=obj.base_model, path=obj.path,
                                            actor=request.user)
            obj.pk = adapter.pk
            obj.refresh_from_db()  # rank and alpha, read from the adapter's config

    def has_delete_permission(self, request, obj=None):
        return False  # usage rows name the adapter: it is removed (disabled), never deleted

    @admin.action(description="Remove selected adapters", permissions=["change"])
    def remove_selected(self, request, queryset):
        removed = [remove_lora_adapter(adapter=a, actor=request.user) for a in queryset.filter(disabled_at__isnull=True)]
        self.message_user(request, f"Removed {len(removed)} adapter(s).", messages.SUCCESS)


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
