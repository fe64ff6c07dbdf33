"""manage.py register_lora_adapter --tenant T --name N --base-model M --path DIR, or --name N --remove:
thin wrappers around tenants.lora_services (checks, audit entry, the replicas' load/unload message)."""
from django.core.management.base import BaseCommand, CommandError

from tenants.errors import LoRAAdapterRefused
from tenants.lora_selectors import get_lora_adapter_by_name
from tenants.lora_services import register_lora_adapter, remove_lora_adapter
from tenants.selectors import get_tenant_by_name


class Command(BaseCommand):
    help = ("Register a PEFT LoRA adapter for a tenant (its keys call it as model=NAME), or --remove one. "
            "The path must be readable here and by the engine replicas of the base model.")

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True, help="the adapter's model name, as clients send it")
        parser.add_argument("--tenant", help="the owning tenant (to register)")
        parser.add_argument("--base-model", help="the served model the adapter was trained on (to register)")
        parser.add_argument("--path", help="the adapter folder: adapter_config.json + adapter_model.safetensors")
        parser.add_argument("--remove", action="store_true", help="stop serving the adapter (its name stays taken)")

    def handle(self, *args, **options):
        if options["remove"]:
            return self._remove(options["name"])
        missing = [f"--{o.replace('_', '-')}" for o in ("tenant", "base_model", "path") if not options[o]]
        if missing:
            raise CommandError(f"registering needs {', '.join(missing)}")
        tenant = get_tenant_by_name(name=options["tenant"])
        if tenant is None:
            raise CommandError(f"unknown tenant {options['tenant']!r}")
        try:
            adapter = register_lora_adapter(tenant=tenant, name=options["name"], base_model=options["base_model"],
                                            path=options["path"], actor="command")
        except LoRAAdapterRefused as error:
            raise CommandError(str(error)) from error
        self.stdout.write(f"Registered LoRA adapter {adapter.name!r} (rank {adapter.rank}, alpha {adapter.alpha:g}) "
                          f"on {adapter.base_model!r} for tenant {tenant.name!r}; replicas load it within seconds.")

    def _remove(self, name: str) -> None:
        adapter = get_lora_adapter_by_name(name=name)
        if adapter is None:
            raise CommandError(f"no LoRA adapter named {name!r}")
        if not adapter.is_active:
            raise CommandError(f"LoRA adapter {name!r} was removed already")
        remove_lora_adapter(adapter=adapter, actor="command")
        self.stdout.write(f"Removed LoRA adapter {name!r} of tenant {adapter.tenant.name!r}.")
