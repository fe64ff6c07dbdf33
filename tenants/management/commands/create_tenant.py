"""manage.py create_tenant NAME [limit options]: a thin wrapper around services.create_tenant."""
import json

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from tenants.errors import TenantAlreadyExists
from tenants.models import BudgetPeriod
from tenants.services import TENANT_LIMIT_FIELDS, create_tenant


class Command(BaseCommand):
    help = "Create a tenant; limits left out take the defaults."

    def add_arguments(self, parser):
        parser.add_argument("name")
        for field in TENANT_LIMIT_FIELDS:
            option = "--" + field.replace("_", "-")
            if field == "budget_period":
                parser.add_argument(option, choices=BudgetPeriod.values)
            elif field == "sampling_defaults":
                parser.add_argument(option, type=json.loads, metavar="JSON",
                                    help='e.g. \'{"temperature": 0.2, "top_p": 0.9}\'')
            else:
                parser.add_argument(option, type=int, metavar="N")

    def handle(self, *args, **options):
        limits = {f: options[f] for f in TENANT_LIMIT_FIELDS if options.get(f) is not None}
        try:
            tenant = create_tenant(name=options["name"], actor="command", **limits)
        except TenantAlreadyExists as exc:
            raise CommandError(str(exc)) from exc
        except ValidationError as exc:
            raise CommandError(f"invalid tenant: {'; '.join(exc.messages)}") from exc
        self.stdout.write(f"Created tenant {tenant.name!r} (id {tenant.pk}).")
