"""Batch job models (none yet)."""
