"""The API key format: generating, parsing and hashing keys (no database access).

A key is `sk-<8 chars>.<secret>`: the part before the dot is the stored,
visible prefix; the secret is `secrets.token_urlsafe(32)` (256 bits, 43 chars).
"""
import hashlib
import re
import secrets
import string

PREFIX_START = "sk-"
PREFIX_RANDOM_LENGTH = 8
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_KEY_RE = re.compile(r"^(sk-[a-z0-9]{8})\.([A-Za-z0-9_-]{43})$")


def generate_key() -> tuple[str, str]:
    """A new (prefix, full key) pair; the full key must be shown once and never stored."""
    prefix = PREFIX_START + "".join(
        secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_RANDOM_LENGTH)
    )
    return prefix, f"{prefix}.{secrets.token_urlsafe(32)}"


def split_key(raw_key: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None."""
    match = _KEY_RE.match(raw_key or "")
    return (match.group(1), match.group(2)) if match else None


def hash_key(raw_key: str) -> str:
    """sha256 hex of the full key (see ApiKey for why not a slow hash or an HMAC)."""
    return hashlib.sha256(raw_key.encode()).hexdigest()
