"""Tenant, API key, limit, quota and usage models (none yet)."""
