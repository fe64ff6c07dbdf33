"""Tenants: who may call the service, with which keys, limits and quotas, and what they used."""
