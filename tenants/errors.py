"""Errors of the tenants app; the API layer maps each family to one HTTP status."""


class TenantsError(Exception):
    """Base of every error this app raises on purpose."""


class InvalidApiKey(TenantsError):
    """The presented key does not authenticate (always HTTP 401).

    `reason` says why, for logs and tests; clients get one generic message so a
    caller cannot probe which prefixes exist.
    """

    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    EXPIRED = "expired"
    TENANT_INACTIVE = "tenant_inactive"

    def __init__(self, reason: str):
        super().__init__(f"invalid API key ({reason})")
        self.reason = reason


class TenantAlreadyExists(TenantsError):
    """create_tenant with a name that is taken."""


class LoRAAdapterRefused(TenantsError):
    """A LoRA adapter that cannot be registered (its folder, its rank, its name); the message says why."""
