"""Fetching converted FaithDiff pipelines from the Hugging Face Hub into a local snapshot, telling local paths from
repository ids, and failing fast when the Hub cannot be reached."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import get_session, httpx

# Files every component folder may need besides its weights (configs, tokenizer vocabularies, processors).
_SUPPORT_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.py"]
_DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")

_FOLDER_INSTEAD = "FaithDiffSDXLPipeline.from_pretrained(FOLDER), or `--model FOLDER` on the command line"

# Seconds the reachability probe waits for the Hub. huggingface_hub's own requests wait 10 s per file and retry with
# backoff before falling back to the cache, which adds up to half a minute or more when the Hub is down.
HUB_PROBE_TIMEOUT = 4.0


def weight_patterns(variant: str | None) -> list[str]:
    """``allow_patterns`` for the safetensors weights of ``variant`` (``None``: the full-precision files).

    Diffusers names variant files ``name.VARIANT.safetensors`` (sharded: ``name.VARIANT-0000x-of-0000y``); only
    those of the requested variant are downloaded.
    """
    if variant:
        return [f"*/*.{variant}.safetensors", f"*/*.{variant}-*.safetensors", f"*/*.safetensors.index.{variant}.json"]
    names = ("diffusion_pytorch_model", "model")
    return [f"*/{name}.safetensors" for name in names] + [f"*/{name}-*-of-*.safetensors" for name in names]


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` can only be meant as a local path, never as a Hub repository id (``name`` or
    ``owner/name``, which start with a letter or digit and hold at most one ``/`` and no backslash).

    Only the spelling is looked at: callers check first whether the path exists (as a folder or a file).
    """
    return name.startswith((".", "~")) or os.path.isabs(name) or name.count("/") > 1 or "\\" in name


def hub_unreachable_reason(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """``None`` when the Hub answers within ``timeout`` seconds; otherwise why it cannot be used, in a few words.

    The probe goes through huggingface_hub's own HTTP client, so its proxy and certificate settings apply.
    """
    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    try:
        response = get_session().head(endpoint, timeout=timeout)
    except httpx.TimeoutException:
        return f"{endpoint} did not answer within {timeout:g} s"
    except httpx.TransportError as error:
        return f"{endpoint}: {_one_line(error) or type(error).__name__}"
    if response.status_code >= 500:
        return f"{endpoint} answered HTTP {response.status_code}"
    return None


def unreachable_message(repo_id: str, reason: str, instead: str) -> str:
    """The one-line error for a Hub repository that is needed while the Hub cannot be reached."""
    return (
        f"The Hugging Face Hub could not be reached ({reason}) and {repo_id!r} is not in the local cache. "
        f"Use a local converted folder instead: {instead}."
    )


def resolve_pipeline_folder(name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> str:
    """A local folder for ``name_or_path``: itself if it is a directory, else a Hub snapshot of that repository.

    Download options (``cache_dir``, ``revision``, ``token``, ...) are taken out of ``kwargs``; ``variant`` is read
    but left in place for diffusers' loader. A name that can only be a local path must exist. When the Hub cannot be
    reached, a repository is taken from the local cache or fails at once with a ValueError.
    """
    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"`pretrained_model_name_or_path` {path!r} is a file; expected a pipeline folder.")
    if looks_like_local_path(path):
        raise ValueError(f"`pretrained_model_name_or_path` {path!r} does not exist.")
    download = {key: kwargs.pop(key) for key in _DOWNLOAD_KWARGS if key in kwargs}
    patterns = _SUPPORT_PATTERNS + weight_patterns(kwargs.get("variant"))
    # With local_files_only the caller chose the cache alone: huggingface_hub's own error says so.
    reason = None if download.get("local_files_only") else hub_unreachable_reason()
    if reason is None:
        return snapshot_download(repo_id=path, allow_patterns=patterns, **download)
    return _cached_snapshot(path, patterns, download, reason)


def _cached_snapshot(repo_id: str, patterns: list[str], download: dict[str, Any], reason: str) -> str:
    """The snapshot of ``repo_id`` from the local cache alone (the Hub cannot be used, for ``reason``)."""
    try:
        return snapshot_download(repo_id=repo_id, allow_patterns=patterns, **{**download, "local_files_only": True})
    except LocalEntryNotFoundError as error:
        raise ValueError(unreachable_message(repo_id, reason, _FOLDER_INSTEAD)) from error


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
