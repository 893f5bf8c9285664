"""Import-time plumbing shared by the package's ``__init__`` files; it must stay free of heavy imports."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, Mapping, Sequence

# The image processors diffusers imports from transformers when its SDXL pipeline and IP-Adapter loader are imported.
# FaithDiff uses neither, but without torchvision transformers logs that each falls back to its PIL version.
_DIFFUSERS_IMAGE_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor")
_TRANSFORMERS_IMPORT_LOGGER = "transformers.utils.import_utils"


def export_table(import_structure: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``{public name: submodule}`` from diffusers-style ``{submodule: [public names]}``."""
    return {name: module for module, names in import_structure.items() for name in names}


def lazy_export(package: str, exports: Mapping[str, str], name: str) -> Any:
    """The public ``name`` of ``package``, imported from its submodule on first use (a module ``__getattr__``).

    Raises:
        AttributeError: ``name`` is not exported, which also lets ``from package import submodule`` find submodules.
    """
    if name not in exports:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{exports[name]}", package), name)
    # Later look-ups then find a plain attribute and never reach ``__getattr__`` again.
    setattr(sys.modules[package], name, value)
    return value


class _FallbackNoticeFilter(logging.Filter):
    """Drops transformers' notice that one of ``_DIFFUSERS_IMAGE_PROCESSORS`` falls back to its PIL version."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(
            message.startswith(f"`{name}` requires torchvision (not installed); falling back to `{name}Pil`")
            for name in _DIFFUSERS_IMAGE_PROCESSORS
        )


def quiet_diffusers_import_notices() -> None:
    """Keeps importing the pipeline from printing transformers' torchvision notices, which concern image processors
    that diffusers imports for features FaithDiff does not have.

    They are logged (once per process) from inside diffusers' own imports, so there is no import path of ours to
    change. Installed on transformers' import logger without importing transformers: ``logging.getLogger`` hands
    transformers this same logger later. transformers logs each notice once per process and importing the pipeline
    always spends it, so later uses of these processors would not have shown it anyway; other messages pass.
    """
    logger = logging.getLogger(_TRANSFORMERS_IMPORT_LOGGER)
    if not any(isinstance(existing, _FallbackNoticeFilter) for existing in logger.filters):
        logger.addFilter(_FallbackNoticeFilter())
