"""manage.py create_api_key TENANT: prints the new key alone on its last line, for scripts.

--replace revokes the tenant's active keys of the same --name first: a script that mints its own key
on every run (scripts/serve's demo key) leaves one active key, not one more per run. Keys are
stored only as hashes, so an old one cannot be shown again and reused.
"""
from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from tenants.selectors import get_tenant_by_name, get_tenant_keys
from tenants.services import create_api_key, revoke_api_key


class Command(BaseCommand):
    help = "Create an API key for a tenant and print it once (it is stored only as a hash)."

    def add_arguments(self, parser):
        parser.add_argument("tenant", help="tenant name")
        parser.add_argument("--name", default="", help="a label for the key")
        parser.add_argument(
            "--models", nargs="+", default=[], metavar="MODEL",
            help="models the key may call (default: all)",
        )
        parser.add_argument("--expires-in-days", type=int, metavar="N")
        parser.add_argument(
            "--replace", action="store_true",
            help="revoke the tenant's active keys with the same --name first",
        )

    def handle(self, *args, **options):
        tenant = get_tenant_by_name(name=options["tenant"])
        if tenant is None:
            raise CommandError(f"unknown tenant {options['tenant']!r}")
        days = options["expires_in_days"]
        if days is not None and days <= 0:
            raise CommandError("--expires-in-days must be positive")
        with transaction.atomic():
            revoked = self._revoke_same_name(tenant, options["name"]) if options["replace"] else []
            api_key, raw_key = create_api_key(
                tenant=tenant,
                name=options["name"],
                allowed_models=options["models"],
                expires_at=timezone.now() + timedelta(days=days) if days is not None else None,
                actor="command",
            )
        if revoked:
            self.stdout.write(f"Revoked {len(revoked)} earlier key(s) named {options['name']!r}: "
                              + ", ".join(revoked))
        self.stdout.write(
            f"Created API key {api_key.prefix} for tenant {tenant.name!r}. "
            "It is shown only now; store it safely:"
        )
        self.stdout.write(raw_key)

    @staticmethod
    def _revoke_same_name(tenant, name: str) -> list[str]:
        """Prefixes of the keys revoked: the tenant's unrevoked keys called `name`."""
        earlier = list(get_tenant_keys(tenant=tenant).filter(name=name, revoked_at__isnull=True))
        for api_key in earlier:
            revoke_api_key(api_key=api_key, actor="command")
        return [api_key.prefix for api_key in earlier]
