"""The operator dashboard at /dashboard/: staff-only pages beside Django admin (see urls.py)."""
