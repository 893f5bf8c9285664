"""Fetching converted FaithDiff pipelines from the Hugging Face Hub into a local snapshot."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import snapshot_download

# Files every component folder may need besides its weights (configs, tokenizer vocabularies, processors).
_SUPPORT_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.py"]
_DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")


def weight_patterns(variant: str | None) -> list[str]:
    """``allow_patterns`` for the safetensors weights of ``variant`` (``None``: the full-precision files).

    Diffusers names variant files ``name.VARIANT.safetensors`` (sharded: ``name.VARIANT-0000x-of-0000y``); only
    those of the requested variant are downloaded.
    """
    if variant:
        return [f"*/*.{variant}.safetensors", f"*/*.{variant}-*.safetensors", f"*/*.safetensors.index.{variant}.json"]
    names = ("diffusion_pytorch_model", "model")
    return [f"*/{name}.safetensors" for name in names] + [f"*/{name}-*-of-*.safetensors" for name in names]


def resolve_pipeline_folder(name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> str:
    """A local folder for ``name_or_path``: itself if it is a directory, else a Hub snapshot of that repository.

    Download options (``cache_dir``, ``revision``, ``token``, ...) are taken out of ``kwargs``; ``variant`` is read
    but left in place for diffusers' loader.
    """
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    download = {key: kwargs.pop(key) for key in _DOWNLOAD_KWARGS if key in kwargs}
    return snapshot_download(
        repo_id=path,
        allow_patterns=_SUPPORT_PATTERNS + weight_patterns(kwargs.get("variant")),
        **download,
    )
