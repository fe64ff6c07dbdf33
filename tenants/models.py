"""Tenants, their API keys, limits and LoRA adapters; usage events and roll-ups; the audit log of admin changes."""
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

from tenants.sampling_defaults import validate_sampling_defaults


class BudgetPeriod(models.TextChoices):
    DAY = "day", "Day"
    MONTH = "month", "Month"


class Tenant(models.Model):
    """A customer or internal team; owns keys and the default limits those keys run under."""

    name = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    is_active = models.BooleanField(default=True)

    requests_per_minute = models.PositiveIntegerField(default=60)
    tokens_per_minute = models.PositiveIntegerField(default=100_000)
    max_concurrent_requests = models.PositiveIntegerField(default=8)
    # Tokens (prompt + completion) per budget period; null means unlimited.
    token_budget = models.PositiveBigIntegerField(null=True, blank=True)
    budget_period = models.CharField(
        max_length=5, choices=BudgetPeriod.choices, default=BudgetPeriod.MONTH
    )
    max_tokens_cap = models.PositiveIntegerField(default=4096)
    max_prompt_tokens = models.PositiveIntegerField(default=8192)
    # Sequences are what the engine schedules: n x prompts of one call. 256 is one full engine batch
    # (vLLM's default max_num_seqs) and twice OpenAI's n cap, so n=128 over two prompts still runs.
    max_sequences_per_request = models.PositiveIntegerField(default=256)
    # Sequences of all the tenant's calls queued or running at once, so one tenant cannot queue
    # thousands ahead of everyone; as large as one call's cap, so the largest call can run alone.
    max_sequences_in_flight = models.PositiveIntegerField(default=256)
    # Same sense as the engine's request priority: lower runs first.
    priority_tier = models.IntegerField(default=0)
    # Values for the sampling fields its calls leave out (temperature, top_p, top_k, min_p,
    # repetition_penalty), over the model's own defaults and OpenAI's.
    sampling_defaults = models.JSONField(default=dict, blank=True, validators=[validate_sampling_defaults],
                                         help_text='e.g. {"temperature": 0.2}; empty: the model\'s defaults')

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ApiKey(models.Model):
    """A bearer key of one tenant, stored only as a hash behind a visible, indexed prefix.

    The full key is `<prefix>.<secret>`; `prefix` finds the row, `hashed_key`
    (sha256 hex of the full key) proves it. Plain sha256 suffices because the
    secret is 256 random bits (no brute force to slow down), and unlike an
    HMAC with SECRET_KEY it keeps every key valid across secret rotation.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, unique=True, db_index=True)
    hashed_key = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    # Model names this key may call; empty means every model.
    allowed_models = models.JSONField(default=list, blank=True)

    # Per-key overrides of the tenant's limits; null means "use the tenant's".
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    max_concurrent_requests = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.tenant})"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def is_expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    @property
    def status(self) -> str:
        """One word for lists and the admin: revoked wins over expired."""
        if self.is_revoked:
            return "revoked"
        if self.is_expired:
            return "expired"
        return "active"


# What clients may send as `model` and what the engine names models by: letters, digits and ._:/-
# ("HuggingFaceTB/SmolLM2-135M-Instruct", "dummy:llama-3.1-8b"), starting with a letter or digit.
validate_model_name = RegexValidator(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*\Z",
                                     "Use letters, digits and . _ : / - (starting with a letter or digit).")


class LoRAAdapter(models.Model):
    """A LoRA adapter of one tenant on a base model: clients call it by `name` as their `model`.

    Only the owning tenant's keys see and call it; to everyone else the name does not exist. The
    name is held for good (usage rows name the adapter), also once removed: `disabled_at` is set
    and the engines drop it. `rank` and `alpha` are read from its adapter_config.json at registration.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="lora_adapters")
    name = models.CharField(max_length=200, unique=True, validators=[validate_model_name])
    base_model = models.CharField(max_length=200)
    # A PEFT adapter folder, as the engine replicas see it (and the process that registers it).
    path = models.CharField(max_length=1000)
    rank = models.PositiveIntegerField()
    alpha = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)
    disabled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "LoRA adapter"

    def __str__(self) -> str:
        return self.name

    @property
    def is_active(self) -> bool:
        return self.disabled_at is None


class UsageStatus(models.TextChoices):
    OK = "ok", "OK"
    ERROR = "error", "Error"
    CANCELLED = "cancelled", "Cancelled"


class UsageEvent(models.Model):
    """One finished request and what it cost: the source of truth for quotas and roll-ups."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="usage_events")
    # Kept when the key is deleted, so the tenant's usage history stays whole.
    api_key = models.ForeignKey(
        ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="usage_events"
    )
    request_id = models.CharField(max_length=100, unique=True)
    model = models.CharField(max_length=200)
    endpoint = models.CharField(max_length=50)  # e.g. "chat.completions"
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=10, choices=UsageStatus.choices, default=UsageStatus.OK)
    error_code = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    user = models.CharField(max_length=256, blank=True, default="")  # OpenAI's `user` field: the caller's end user

    class Meta:
        ordering = ["-created_at"]
        # Tenant-scoped reads and the quota seed filter by tenant and time.
        indexes = [models.Index(fields=["tenant", "created_at"])]

    def __str__(self) -> str:
        return f"{self.request_id} ({self.tenant_id})"


class DailyUsage(models.Model):
    """Usage of one tenant and model on one UTC day, recomputed from UsageEvent by roll_up_usage."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="daily_usage")
    day = models.DateField()
    model = models.CharField(max_length=200)
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-day", "model"]
        verbose_name_plural = "daily usage"
        constraints = [
            models.UniqueConstraint(fields=["tenant", "day", "model"], name="daily_usage_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.day} {self.model}"


class AuditLog(models.Model):
    """Who changed which tenant or key, and how; never holds key material (see tenants.audit)."""

    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
        related_name="+",
    )
    # The user name, or "system"/"command" for changes made outside the admin.
    actor_label = models.CharField(max_length=150)
    action = models.CharField(max_length=50, db_index=True)  # e.g. "tenant.update"
    # Null once the tenant is deleted; `target` still names it.
    tenant = models.ForeignKey(
        Tenant, on_delete=models.SET_NULL, null=True, blank=True, related_name="audit_entries"
    )
    target = models.CharField(max_length=200)
    # field -> [old, new]
    changes = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "audit log entry"
        verbose_name_plural = "audit log"

    def __str__(self) -> str:
        return f"{self.action} {self.target} by {self.actor_label}"
