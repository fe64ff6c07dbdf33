"""manage.py create_api_key TENANT: prints the new key alone on its last line, for scripts."""
from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from tenants.selectors import get_tenant_by_name
from tenants.services import create_api_key


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

    def handle(self, *args, **options):
        tenant = get_tenant_by_name(name=options["tenant"])
        if tenant is None:
            raise CommandError(f"unknown tenant {options['tenant']!r}")
        days = options["expires_in_days"]
        if days is not None and days <= 0:
            raise CommandError("--expires-in-days must be positive")
        api_key, raw_key = create_api_key(
            tenant=tenant,
            name=options["name"],
            allowed_models=options["models"],
            expires_at=timezone.now() + timedelta(days=days) if days is not None else None,
            actor="command",
        )
        self.stdout.write(
            f"Created API key {api_key.prefix} for tenant {tenant.name!r}. "
            "It is shown only now; store it safely:"
        )
        self.stdout.write(raw_key)
