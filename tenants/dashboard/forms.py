"""Input forms of the dashboard's actions; they only validate, the views hand the data to services."""
from django import forms

from tenants.models import Tenant
from tenants.services import TENANT_LIMIT_FIELDS


class _SamplingDefaultsField:
    def clean_sampling_defaults(self) -> dict:
        """An empty box means no defaults of the tenant's own ({}), not null."""
        return self.cleaned_data.get("sampling_defaults") or {}


class TenantCreateForm(_SamplingDefaultsField, forms.ModelForm):
    class Meta:
        model = Tenant
        fields = ("name", *TENANT_LIMIT_FIELDS)


class TenantLimitsForm(_SamplingDefaultsField, forms.ModelForm):
    """Bound without an instance (so validating never mutates the tenant before the service runs)."""

    class Meta:
        model = Tenant
        fields = ("is_active", *TENANT_LIMIT_FIELDS)


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(max_length=100, required=False)
    allowed_models = forms.CharField(
        required=False, help_text="Comma-separated model names; empty allows every model."
    )
    expires_at = forms.DateTimeField(
        required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="UTC; empty never expires.",
    )

    def clean_allowed_models(self) -> list[str]:
        return [name.strip() for name in self.cleaned_data["allowed_models"].split(",") if name.strip()]


class LoRAAdapterRegisterForm(forms.Form):
    name = forms.CharField(max_length=200, help_text="The model name the tenant's clients send.")
    base_model = forms.CharField(max_length=200, help_text="A served model the adapter was trained on.")
    path = forms.CharField(max_length=1000, help_text="The PEFT adapter folder, as the engine replicas see it.")
