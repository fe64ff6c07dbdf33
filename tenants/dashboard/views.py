"""Views of the operator dashboard: thin, staff-only; reads via selectors, every write via a service.

Each action is a CSRF-protected POST that passes `actor=request.user` to its service, so the audit
log names the operator, then redirects (post/redirect/get) with a message. The one exception is
key creation, which renders the raw key once and never stores it, not even in the session.
"""
from functools import wraps

from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from tenants.dashboard import selectors
from tenants.dashboard.charts import Series, bar_chart, line_chart
from tenants.dashboard.forms import ApiKeyCreateForm, LoRAAdapterRegisterForm, TenantCreateForm, TenantLimitsForm
from tenants.errors import LoRAAdapterRefused, TenantAlreadyExists
from tenants.lora_selectors import adapter_load_status, get_tenant_lora_adapters, live_replicas_by_model
from tenants.lora_services import register_lora_adapter, remove_lora_adapter
from tenants.models import ApiKey, LoRAAdapter, Tenant
from tenants.selectors import get_tenant_keys
from tenants.services import create_api_key, create_tenant, revoke_api_key, update_tenant


def staff_required(view):
    """Anonymous users are sent to the login page; signed-in users who are not staff get a 403."""
    @wraps(view)
    def guarded(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path(), reverse("dashboard:login"))
        if not (request.user.is_active and request.user.is_staff):
            raise PermissionDenied("The dashboard is for staff only.")
        return view(request, *args, **kwargs)
    return guarded


@require_GET
@staff_required
def overview(request):
    return _render_overview(request, TenantCreateForm())


@require_POST
@staff_required
def tenant_create(request):
    form = TenantCreateForm(request.POST)
    if not form.is_valid():
        return _render_overview(request, form, status=400)
    try:
        tenant = create_tenant(actor=request.user, **form.cleaned_data)
    except TenantAlreadyExists as error:
        form.add_error("name", str(error))
        return _render_overview(request, form, status=400)
    messages.success(request, f"Created tenant {tenant.name}.")
    return redirect("dashboard:tenant", pk=tenant.pk)


@require_GET
@staff_required
def tenant_detail(request, pk: int):
    tenant = get_object_or_404(Tenant, pk=pk)
    return _render_tenant(request, tenant, limits_form=_limits_form(tenant))


@require_POST
@staff_required
def tenant_limits(request, pk: int):
    tenant = get_object_or_404(Tenant, pk=pk)
    form = TenantLimitsForm(request.POST)
    if not form.is_valid():
        return _render_tenant(request, tenant, limits_form=form, status=400)
    update_tenant(tenant=tenant, actor=request.user, **form.cleaned_data)
    messages.success(request, f"Saved the limits of {tenant.name}.")
    return redirect("dashboard:tenant", pk=tenant.pk)


@never_cache
@require_POST
@staff_required
def key_create(request, pk: int):
    tenant = get_object_or_404(Tenant, pk=pk)
    form = ApiKeyCreateForm(request.POST)
    if not form.is_valid():
        return _render_tenant(request, tenant, limits_form=_limits_form(tenant), key_form=form, status=400)
    api_key, raw_key = create_api_key(tenant=tenant, actor=request.user, **form.cleaned_data)
    return render(request, "dashboard/key_created.html", {"tenant": tenant, "api_key": api_key, "raw_key": raw_key})


@require_POST
@staff_required
def key_revoke(request, pk: int):
    api_key = get_object_or_404(ApiKey.objects.select_related("tenant"), pk=pk)
    revoke_api_key(api_key=api_key, actor=request.user)
    messages.success(request, f"Revoked key {api_key.prefix}.")
    return redirect("dashboard:tenant", pk=api_key.tenant_id)


@require_POST
@staff_required
def adapter_register(request, pk: int):
    tenant = get_object_or_404(Tenant, pk=pk)
    form = LoRAAdapterRegisterForm(request.POST)
    if form.is_valid():
        try:
            adapter = register_lora_adapter(tenant=tenant, actor=request.user, **form.cleaned_data)
        except LoRAAdapterRefused as error:
            form.add_error(None, str(error))
    if not form.is_valid():
        return _render_tenant(request, tenant, limits_form=_limits_form(tenant), adapter_form=form, status=400)
    messages.success(request, f"Registered LoRA adapter {adapter.name}; replicas load it within seconds.")
    return redirect("dashboard:tenant", pk=tenant.pk)


@require_POST
@staff_required
def adapter_remove(request, pk: int):
    adapter = get_object_or_404(LoRAAdapter.objects.select_related("tenant"), pk=pk)
    remove_lora_adapter(adapter=adapter, actor=request.user)
    messages.success(request, f"Removed LoRA adapter {adapter.name}.")
    return redirect("dashboard:tenant", pk=adapter.tenant_id)


def _render_overview(request, create_form: TenantCreateForm, status: int = 200):
    usage = selectors.usage_by_day()
    engines = selectors.engine_status()
    return render(request, "dashboard/overview.html", {
        "today": usage[-1][1],
        "live_replicas": sum(len(engine.replicas) for engine in engines or ()),
        "charts": _usage_charts(usage),
        "top_tenants": selectors.top_tenants(),
        "tenants": selectors.tenants_with_key_counts(),
        "engines": engines,
        "batches": selectors.recent_batches(),
        "create_form": create_form,
    }, status=status)


def _render_tenant(request, tenant: Tenant, *, limits_form, key_form=None, adapter_form=None, status: int = 200):
    return render(request, "dashboard/tenant.html", {
        "tenant": tenant,
        "charts": _usage_charts(selectors.usage_by_day(tenant=tenant)),
        "usage_by_model": selectors.usage_by_model(tenant=tenant),
        "budget": selectors.budget_status(tenant=tenant),
        "keys": get_tenant_keys(tenant=tenant),
        "adapters": adapter_load_status(adapters=get_tenant_lora_adapters(tenant=tenant),
                                        replicas_by_model=live_replicas_by_model()),
        "audit_entries": selectors.tenant_audit_entries(tenant=tenant),
        "limits_form": limits_form,
        "key_form": key_form or ApiKeyCreateForm(),
        "adapter_form": adapter_form or LoRAAdapterRegisterForm(),
    }, status=status)


def _limits_form(tenant: Tenant) -> TenantLimitsForm:
    return TenantLimitsForm(initial={f: getattr(tenant, f) for f in TenantLimitsForm.Meta.fields})


def _usage_charts(usage) -> list:
    """The two charts of a usage series: tokens in/out as bars, requests and errors as lines."""
    labels = [day.strftime("%b %d") for day, _ in usage]
    return [
        bar_chart(title="Tokens per day", labels=labels, series=[
            Series("prompt (in)", [u.prompt_tokens for _, u in usage]),
            Series("completion (out)", [u.completion_tokens for _, u in usage]),
        ]),
        line_chart(title="Requests per day", labels=labels, series=[
            Series("requests", [u.requests for _, u in usage]),
            Series("errors", [u.errors for _, u in usage]),
        ]),
    ]
