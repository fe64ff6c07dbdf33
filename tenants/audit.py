"""The audit log service: one entry per admin change of a tenant or key, never with key material."""
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import models
from django.forms import ModelForm

from tenants.models import AuditLog, Tenant

# Never written to an entry, whatever a caller passes (the full key itself is stored nowhere).
SECRET_FIELDS = frozenset({"hashed_key"})

Actor = AbstractBaseUser | str | None  # a user, a label such as "command", or None for "system"


def record_audit(
    *, actor: Actor, action: str, target: models.Model, changes: dict[str, list] | None = None
) -> AuditLog:
    """Log `action` (e.g. "tenant.update") on `target` with `changes` as field -> [old, new]."""
    user = actor if isinstance(actor, AbstractBaseUser) else None
    label = user.get_username() if user is not None else (actor or "system")
    tenant = target if isinstance(target, Tenant) else getattr(target, "tenant", None)
    return AuditLog.objects.create(
        actor=user,
        actor_label=label,
        action=action,
        tenant=tenant,
        target=str(target)[:200],
        changes={
            f: [_plain(old), _plain(new)]
            for f, (old, new) in (changes or {}).items()
            if f not in SECRET_FIELDS
        },
    )


def _plain(value):
    """A related object as its primary key, so every change stays JSON."""
    return value.pk if isinstance(value, models.Model) else value


def created(instance: models.Model, fields) -> dict[str, list]:
    """Changes of a new object: each field from None to its value."""
    return {f: [None, getattr(instance, f)] for f in fields}


def deleted(instance: models.Model) -> dict[str, list]:
    """Changes of a deleted object: each concrete field from its value to None."""
    return {
        f.attname: [getattr(instance, f.attname), None]
        for f in instance._meta.concrete_fields
        if not f.primary_key
    }


def form_changes(form: ModelForm, *, is_new: bool) -> dict[str, list]:
    """What an admin form changed, field by field (every field, for a new object)."""
    fields = form.fields if is_new else form.changed_data
    return {
        f: [None if is_new else form.initial.get(f), form.cleaned_data.get(f)] for f in fields
    }
