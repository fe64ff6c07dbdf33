"""Models named by their Hugging Face Hub id: the local cache first (no network), then a download
unless HF_HUB_OFFLINE is set. Only what the engine reads is fetched: config, weights, tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def cache_dir() -> str:
    """Read per call (huggingface_hub reads its variables once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The folder of `repo_id` at `revision` (default: main) in the cache, downloaded if missing."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    where = f"{repo_id}{'@' + revision if revision else ''}"
    if _offline():
        raise FileNotFoundError(f"model {where!r} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is "
                                f"set: download it there (huggingface-cli download {repo_id}) or give a local path")
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as error:  # no network, no such repository, a gated one without a token...
        raise FileNotFoundError(f"model {where!r} is not in the Hugging Face cache {cache} and could not be "
                                f"downloaded ({type(error).__name__}: {error})") from error
