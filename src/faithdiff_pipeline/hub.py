"""Fetching converted FaithDiff pipelines from the Hugging Face Hub into a local snapshot, telling local paths from
repository ids, failing fast when the Hub cannot be reached, and the custom-code files that let plain diffusers load
our folders."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from huggingface_hub import constants, create_repo, snapshot_download, upload_folder
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import get_session, httpx

# Plain diffusers loads a class it does not ship from a Python file in the pipeline folder, and runs that file only
# with ``trust_remote_code=True``: the pipeline from ``"_class_name": [FILE, CLASS]`` and ``FILE.py`` at the top of
# the folder, a component from ``[FILE, CLASS]`` and ``COMPONENT/FILE.py``. Our files only import the installed
# package, so what runs is the package's code, never code that travels with a folder or a Hub repository.
PIPELINE_CODE = "pipeline_faithdiff_sdxl"
# The distribution to install, for messages (the import name is ``faithdiff_pipeline``).
DISTRIBUTION = "faithdiff-pipeline"
MODEL_INDEX = "model_index.json"

# diffusers' modular pipelines read a folder through these files: the components' loading specs
# (``ModularPipeline.config_name``) and the blocks' definition (``ModularPipelineBlocks.config_name``), whose
# ``auto_map`` names a code file at the top of the folder that ``trust_remote_code=True`` runs. Ours imports the blocks
# from the installed package, as the custom-code files above import the pipeline.
MODULAR_INDEX = "modular_model_index.json"
MODULAR_CONFIG = "modular_config.json"
MODULAR_BLOCKS = "FaithDiffSDXLAutoBlocks"
# diffusers finds the pipeline class a modular index names in its own namespace alone
# (diffusers.pipelines.pipeline_loading_utils._get_pipeline_class: getattr(diffusers, _class_name)), so the index names
# the SDXL class that FaithDiffSDXLModularPipeline extends.
MODULAR_PIPELINE = "StableDiffusionXLModularPipeline"

# Files every component folder may need besides its weights (configs, tokenizer vocabularies, processors, custom
# code), and the pipeline's custom-code file, so that a snapshot is a folder plain diffusers loads too.
_SUPPORT_PATTERNS = [
    MODEL_INDEX,
    f"{PIPELINE_CODE}.py",
    MODULAR_INDEX,
    MODULAR_CONFIG,
    "modular_blocks_*.py",
    "*/*.json",
    "*/*.txt",
    "*/*.model",
    "*/*.py",
]
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


# A weights file as diffusers and transformers name them: NAME[.VARIANT][-0000x-of-0000y].safetensors (or .bin).
_WEIGHTS_FILE = re.compile(r"^[^.]+?(?:\.(?P<variant>[^.]+?))?(?:-\d+-of-\d+)?\.(?:safetensors|bin)$")


def folder_weight_variants(folder: str | os.PathLike) -> dict[str, set[str | None]]:
    """The weights variants each component of a local pipeline folder holds, by component folder (``None``: the
    full-precision files); components without weights files (tokenizers, scheduler) are left out."""
    found: dict[str, set[str | None]] = {}
    for component in sorted(Path(folder).iterdir()):
        if not component.is_dir():
            continue
        for file in component.iterdir():
            match = _WEIGHTS_FILE.match(file.name)
            if match:
                found.setdefault(component.name, set()).add(match["variant"])
    return found


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


# --- diffusers' custom-code layout ------------------------------------------------------------------------------------

# How plain diffusers loads a folder: the pipeline, or its modular blocks.
PIPELINE_LOADER = "DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)"
MODULAR_LOADER = "ModularPipeline.from_pretrained(FOLDER, trust_remote_code=True)"

_CODE_TEMPLATE = '''\
"""Lets plain diffusers load this folder: `{loader}`.

Written by {distribution}; {class_name} comes from the installed package, which this file only imports.
"""

try:
    from {package} import {class_name}
except ModuleNotFoundError as error:
    if error.name != "{package}":
        raise
    raise ImportError(
        "This is a FaithDiff pipeline: loading it needs the {distribution} package "
        "(`pip install {distribution}`), which provides {class_name}."
    ) from error

__all__ = ["{class_name}"]
'''


def component_code(component: str) -> str:
    """The name of the custom-code file (without ``.py``) in the folder of ``component``."""
    return f"faithdiff_{component}"


def custom_code_source(class_name: str, loader: str = PIPELINE_LOADER) -> str:
    """The text of a custom-code file that hands diffusers our installed ``class_name``, read by ``loader``."""
    return _CODE_TEMPLATE.format(
        package=__package__, class_name=class_name, distribution=DISTRIBUTION, loader=loader
    )


def _exported_class(name: object) -> type | None:
    """The class the package exports as ``name``, or None for any other name (functions included)."""
    package = sys.modules[__package__]
    if not isinstance(name, str) or name not in package.__all__:
        return None
    value = getattr(package, name)
    return value if isinstance(value, type) else None


def _is_our_module(library: object) -> bool:
    return isinstance(library, str) and (library == __package__ or library.startswith(f"{__package__}."))


def write_custom_code(folder: str | os.PathLike, pipeline_class: type) -> None:
    """Turns the folder ``DiffusionPipeline.save_pretrained`` wrote into diffusers' custom-code layout.

    ``_class_name`` becomes ``[PIPELINE_CODE, CLASS]`` beside ``PIPELINE_CODE.py`` when ``pipeline_class`` is one the
    package exports (a subclass of it defined elsewhere keeps diffusers' plain class name); every component of ours
    (``["faithdiff_pipeline.MODULE", CLASS]``) becomes ``[component_code(NAME), CLASS]`` beside its file. The index
    is replaced in one rename, after the files it names exist.
    """
    from .atomic_files import write_text_atomic

    folder = Path(folder)
    index = json.loads((folder / MODEL_INDEX).read_text(encoding="utf-8"))
    files: dict[Path, str] = {}
    if _exported_class(pipeline_class.__name__) is pipeline_class:
        index["_class_name"] = [PIPELINE_CODE, pipeline_class.__name__]
        files[folder / f"{PIPELINE_CODE}.py"] = pipeline_class.__name__
    for name, entry in index.items():
        if isinstance(entry, list) and len(entry) == 2 and _is_our_module(entry[0]) and _exported_class(entry[1]):
            index[name] = [component_code(name), entry[1]]
            files[folder / name / f"{component_code(name)}.py"] = entry[1]
    for path, class_name in files.items():
        write_text_atomic(path, custom_code_source(class_name))
    # diffusers' own formatting of the index (ConfigMixin.to_json_string), so that the file only changes where ours.
    write_text_atomic(folder / MODEL_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")


def installed_index(index: dict[str, Any]) -> dict[str, Any]:
    """``index`` (a loaded ``model_index.json``, changed in place and returned) as our own loader reads it.

    The entries :func:`write_custom_code` wrote name the installed classes instead of the folder's files, so that
    ``FaithDiffSDXLPipeline.from_pretrained`` never runs code from a folder and needs no ``trust_remote_code``.
    Entries that are not ours, and folders written before the custom-code layout, are left as they are.
    """
    pipeline = index.get("_class_name")
    if isinstance(pipeline, list) and len(pipeline) == 2 and pipeline[0] == PIPELINE_CODE:
        if _exported_class(pipeline[1]) is not None:
            index["_class_name"] = pipeline[1]
    for name, entry in index.items():
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == component_code(name):
            found = _exported_class(entry[1])
            if found is not None:
                index[name] = [found.__module__, entry[1]]
    return index


def _installed_library(name: str, entry: list) -> str:
    """The library of a component entry of ``model_index.json`` as diffusers' modular loader imports it: our own
    classes from the installed package (whatever layout the index has), other libraries as they are."""
    library, class_name = entry
    ours = library == component_code(name) or _is_our_module(library)
    found = _exported_class(class_name) if ours else None
    return found.__module__ if found is not None else library


def modular_index(
    index: dict[str, Any], source: str, with_weights: set[str], variant: str | None = None
) -> dict[str, Any]:
    """The ``modular_model_index.json`` of a pipeline folder whose ``model_index.json`` is ``index``: each component
    as diffusers' modular loader reads it (``[library, class, loading spec]``, the spec naming ``source``, a folder or
    a Hub repository, and the component's subfolder), the pipeline's configuration, the blocks that run the
    components, and the pipeline class diffusers builds (:data:`MODULAR_PIPELINE`).

    Args:
        index (`dict`): The folder's ``model_index.json``.
        source (`str`): Where the components are loaded from.
        with_weights (`set[str]`): The components that have weights files, which are loaded as ``variant``.
        variant (`str`, *optional*): The weights variant the folder holds (``"fp16"``), None for full precision.
    """
    import diffusers

    modular: dict[str, Any] = {
        "_class_name": MODULAR_PIPELINE,
        "_diffusers_version": diffusers.__version__,
        "_blocks_class_name": MODULAR_BLOCKS,
    }
    for name, entry in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(entry, list):
            modular[name] = entry
            continue
        if len(entry) != 2 or None in entry:
            continue
        library, class_name = _installed_library(name, entry), entry[1]
        spec = {
            "pretrained_model_name_or_path": source,
            "revision": None,
            "subfolder": name,
            "type_hint": [library, class_name],
            "variant": variant if name in with_weights else None,
        }
        modular[name] = [library, class_name, spec]
    return modular


def modular_index_of_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """The modular index of a local pipeline folder: its ``modular_model_index.json``, or for a folder saved before
    those were written, the one :func:`modular_index` makes of its ``model_index.json``."""
    folder = Path(folder)
    if (folder / MODULAR_INDEX).is_file():
        return json.loads((folder / MODULAR_INDEX).read_text(encoding="utf-8"))
    index = json.loads((folder / MODEL_INDEX).read_text(encoding="utf-8"))
    return modular_index(index, str(folder), set(folder_weight_variants(folder)))


def write_blocks_code(folder: str | os.PathLike, blocks_class: type) -> None:
    """Writes the code file that the ``modular_config.json`` of ``blocks_class`` names: diffusers'
    ``ModularPipelineBlocks.save_pretrained`` maps the blocks to ``MODULE.CLASS``, MODULE being the last part of the
    class's module, and loads ``MODULE.py`` from the folder. Ours imports the blocks from the installed package.
    Blocks the package does not export are left alone: their code is their author's to add."""
    from .atomic_files import write_text_atomic

    class_name = blocks_class.__name__
    if _exported_class(class_name) is blocks_class:
        module = blocks_class.__module__.rsplit(".", 1)[-1]
        write_text_atomic(Path(folder) / f"{module}.py", custom_code_source(class_name, MODULAR_LOADER))


def write_modular_definition(folder: str | os.PathLike, variant: str | None = None) -> None:
    """Lets diffusers' modular pipelines load a folder that ``DiffusionPipeline.save_pretrained`` wrote (and
    :func:`write_custom_code` completed): FaithDiff's blocks (``modular_config.json`` and :func:`write_blocks_code`) and
    ``modular_model_index.json`` (:func:`modular_index`, naming the folder itself), written last, once the files it
    relies on exist. ``variant`` is the weights variant just saved."""
    from .atomic_files import write_text_atomic
    from .modular import FaithDiffSDXLAutoBlocks

    folder = Path(folder)
    FaithDiffSDXLAutoBlocks().save_pretrained(folder)
    index = json.loads((folder / MODEL_INDEX).read_text(encoding="utf-8"))
    modular = modular_index(index, str(folder.resolve()), set(folder_weight_variants(folder)), variant)
    write_text_atomic(folder / MODULAR_INDEX, json.dumps(modular, indent=2, sort_keys=True) + "\n")


def point_modular_index(folder: str | os.PathLike, source: str) -> None:
    """Makes the components of a folder's ``modular_model_index.json`` load from ``source`` (the Hub repository the
    folder is uploaded to, or the folder's final place); a folder without one is left as it is."""
    from .atomic_files import write_text_atomic

    path = Path(folder) / MODULAR_INDEX
    if not path.is_file():
        return
    modular = json.loads(path.read_text(encoding="utf-8"))
    for entry in modular.values():
        if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], dict):
            entry[2]["pretrained_model_name_or_path"] = source
    write_text_atomic(path, json.dumps(modular, indent=2, sort_keys=True) + "\n")


def upload_pipeline_folder(
    folder: str | os.PathLike,
    repo_id: str | None = None,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    create_pr: bool = False,
    token: str | None = None,
) -> Any:
    """Uploads a saved pipeline ``folder`` to the Hub repository ``repo_id`` (created when missing; by default the
    folder's name in your namespace), with the model card diffusers writes for pipelines; returns the commit info.

    It is the upload of ``save_pretrained(..., push_to_hub=True)``, done once the custom-code files are written:
    diffusers' own uploads before its ``save_pretrained`` returns.
    """
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    folder = Path(folder)
    repo_id = create_repo(repo_id or folder.resolve().name, exist_ok=True, private=private, token=token).repo_id
    # Loaded from the Hub, the components are found where the index points: at this repository.
    point_modular_index(folder, repo_id)
    card = populate_model_card(load_or_create_model_card(repo_id, token=token, is_pipeline=True))
    card.save(str(folder / "README.md"))
    return upload_folder(
        repo_id=repo_id, folder_path=folder, token=token, commit_message=commit_message, create_pr=create_pr
    )
