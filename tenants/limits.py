"""EffectiveLimits: the limits a request actually runs under (key overrides over tenant)."""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EffectiveLimits:
    requests_per_minute: int
    tokens_per_minute: int
    max_concurrent_requests: int
    token_budget: int | None  # per budget_period; None = unlimited
    budget_period: str
    max_tokens_cap: int
    max_prompt_tokens: int
    priority_tier: int
    max_sequences_per_request: int = 256  # n x prompts of one call
    max_sequences_in_flight: int = 256  # the tenant's sequences admitted and not yet settled
    sampling_defaults: dict = field(default_factory=dict)  # for the sampling fields a call leaves out
