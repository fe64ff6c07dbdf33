"""manage.py register_lora_adapter --tenant T --name N --base-model M --path DIR, or --name N --remove:
thin wrappers around tenants.lora_services (checks, audit entry, the replicas' load/unload message).

A registration then waits (--wait seconds) for the base model's live replicas to load the adapter or
say why they could not (an adapter made for another model's shapes, say, which only loading finds):
such a failure exits 1 with each replica's reason; the adapter stays registered until --remove.
"""
import time

from django.core.management.base import BaseCommand, CommandError

from tenants.errors import LoRAAdapterRefused
from tenants.lora_selectors import (
    AdapterLoadStatus, adapter_load_status, get_lora_adapter_by_name, live_replicas_by_model,
)
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
        parser.add_argument("--wait", type=float, default=15, metavar="S",
                            help="seconds to wait for the live replicas to load it (default 15; 0: do not wait)")

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
                          f"on {adapter.base_model!r} for tenant {tenant.name!r}.")
        status = self._load_status(adapter, wait_s=options["wait"])
        if status.errors:
            reasons = "; ".join(f"{replica}: {why}" for replica, why in sorted(status.errors.items()))
            raise CommandError(f"{status.summary}; not loaded on {reasons}. Fix the adapter, then "
                               f"`register_lora_adapter --name {adapter.name} --remove` and register it again.")
        self.stdout.write(f"{status.summary.capitalize()}." if status.settled
                          else f"{status.summary.capitalize()} so far; the dashboard shows the rest.")

    @staticmethod
    def _load_status(adapter, *, wait_s: float) -> AdapterLoadStatus:
        deadline = time.monotonic() + wait_s
        while True:
            [status] = adapter_load_status(adapters=[adapter], replicas_by_model=live_replicas_by_model())
            if status.settled or time.monotonic() >= deadline:
                return status
            time.sleep(0.5)

    def _remove(self, name: str) -> None:
        adapter = get_lora_adapter_by_name(name=name)
        if adapter is None:
            raise CommandError(f"no LoRA adapter named {name!r}")
        if not adapter.is_active:
            raise CommandError(f"LoRA adapter {name!r} was removed already")
        remove_lora_adapter(adapter=adapter, actor="command")
        self.stdout.write(f"Removed LoRA adapter {name!r} of tenant {adapter.tenant.name!r}.")
