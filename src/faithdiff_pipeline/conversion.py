"""Conversion of the official FaithDiff release (a pickled state dict + an SDXL base + a VAE) to a diffusers folder.

torch, diffusers, transformers, safetensors and huggingface_hub are imported inside the functions that use them, so
that importing this module, and ``faithdiff-convert --help``, take no time.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import secrets
import shutil
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .pipeline_faithdiff_sdxl import FaithDiffSDXLPipeline

# The official release: checkpoint, SDXL base (text encoders, tokenizers, scheduler, UNet config) and decoding VAE.
RELEASE_FAITHDIFF = "jychen9811/FaithDiff"
RELEASE_BASE = "SG161222/RealVisXL_V4.0"
RELEASE_VAE = "madebyollin/sdxl-vae-fp16-fix"
CHECKPOINT_NAMES = ("FaithDiff.bin", "FaithDiff.safetensors")
RELEASE_HEADS = 8

# Official key prefix -> (component, prefix in our module).
_COMPONENT_PREFIXES = {
    "denoise_encoder.": ("lq_encoder", "encoder."),
    "condition_embedding.": ("alignment", "condition_embedding."),
    "information_transformer_layes.": ("alignment", "blocks."),
    "spatial_ch_projs.": ("alignment", "proj_out."),
}

# A source spelled like a checkpoint file is a file, never a Hub repository id.
_CHECKPOINT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt")
# What torch.load raises, besides UnpicklingError, on truncated or corrupted files (found by truncating saved files
# at every length and flipping bytes in them, in both the zip and the pre-1.6 pickle format).
_CORRUPT_CHECKPOINT_ERRORS = (RuntimeError, OSError, EOFError, ValueError, IndexError, KeyError, struct.error)

PROG = "faithdiff-convert"
# Leftovers beside an output folder carry these marks, so that a later conversion recognises and removes them.
_STAGING_MARK = "faithdiff-staging-"
_RETIRED_MARK = "faithdiff-retired"

# SDXL's micro-conditioning: original size, crop offset and target size, two numbers each.
_SDXL_TIME_IDS = 6

_HUB_INSTEAD = (
    "`faithdiff-upscale --model FOLDER` or FaithDiffSDXLPipeline.from_pretrained(FOLDER); to make one, convert "
    "local copies of the release with `faithdiff-convert FOLDER --faithdiff FILE --base FOLDER --vae FOLDER`"
)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _resolve_source(source: str | os.PathLike, argument: str, folder: bool) -> str:
    """``source`` as a local path (``~`` expanded) or a Hub repository id. A name that can only be a local path
    must exist, so that a typo is reported as such rather than as an unknown repository."""
    from .hub import looks_like_local_path

    path = os.path.expanduser(os.fspath(source))
    if os.path.exists(path):
        if folder and not os.path.isdir(path):
            raise ValueError(f"`{argument}` {path!r} is a file; expected a folder or a Hub repository id.")
        return path
    if looks_like_local_path(path) or path.lower().endswith(_CHECKPOINT_SUFFIXES):
        raise ValueError(f"`{argument}` {path!r} does not exist.")
    return path


def load_official_checkpoint(source: str | os.PathLike, **download: object) -> dict[str, torch.Tensor]:
    """The official state dict from a file (.bin pickle or .safetensors), a folder holding ``FaithDiff.bin``, or a
    Hub repository id (``download`` holds options for ``hf_hub_download``).

    A pickle is read with ``weights_only=True``: one holding anything but tensors in dicts (which could run code
    when unpickled) is refused. So are truncated or corrupt files and files that are not a dict of tensors, each
    with a one-line ValueError.
    """
    path = _checkpoint_path(_resolve_source(source, "faithdiff", folder=False), download)
    state_dict = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch_checkpoint(path)
    _check_state_dict(state_dict, path)
    return state_dict


def _checkpoint_path(source: str, download: Mapping[str, Any]) -> Path:
    path = Path(source)
    if path.is_dir():
        found = [path / name for name in CHECKPOINT_NAMES if (path / name).is_file()]
        if not found:
            raise ValueError(f"`faithdiff` folder {str(path)!r} holds none of {CHECKPOINT_NAMES}.")
        return found[0]
    if path.exists():
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source, CHECKPOINT_NAMES[0], **download))


def _file_kind(path: Path) -> str | None:
    """``"archive"`` for torch.save's zip format, ``"pickle"`` for the pre-1.6 format, ``None`` for neither."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PK\x03\x04":
        return "archive"
    # Every pickle torch ever wrote starts with the PROTO opcode.
    return "pickle" if head[:1] == b"\x80" else None


def _read_torch_checkpoint(path: Path) -> object:
    import pickle

    import torch

    kind = _file_kind(path)
    if kind is None:
        raise ValueError(
            f"`faithdiff` {str(path)!r} is not a PyTorch checkpoint: it is neither a torch.save archive nor a "
            "pickle (empty, cut short at the start, or another format)."
        )
    try:
        # An archive's tensors are mapped rather than read; the pre-1.6 pickle format cannot be mapped.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "archive")
    except pickle.UnpicklingError as error:
        # torch's message recommends weights_only=False, which would run whatever the file holds: not passed on.
        raise ValueError(_refused_message(path, str(error))) from None
    except _CORRUPT_CHECKPOINT_ERRORS as error:
        raise ValueError(
            f"`faithdiff` {str(path)!r} is not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{_one_line(error)}"
        ) from error


def _refused_message(path: Path, torch_message: str) -> str:
    found = re.search(r"GLOBAL (\S+)", torch_message)
    names = f" (it refers to {found.group(1)})" if found else ""
    return (
        f"`faithdiff` {str(path)!r} was refused as unsafe: it is not a plain state dict of tensors{names}, and "
        "unpickling it may run code (or it is corrupt). Use the official FaithDiff.bin or a .safetensors file."
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"`faithdiff` {str(path)!r} is not a readable safetensors file (truncated or corrupt?): {_one_line(error)}"
        ) from error


def _check_state_dict(state_dict: object, path: Path) -> None:
    import torch

    if not isinstance(state_dict, Mapping):
        # The file's content is wrong, not an argument's type.
        raise ValueError(  # noqa: TRY004
            f"`faithdiff` {str(path)!r} holds a {type(state_dict).__name__}, not a state dict (names -> tensors)."
        )
    wrong = [
        f"{key!r} is a {type(value).__name__}"
        for key, value in state_dict.items()
        if not isinstance(key, str) or not isinstance(value, torch.Tensor)
    ]
    if wrong:
        raise ValueError(
            f"`faithdiff` {str(path)!r} is not a state dict of tensors: {', '.join(wrong[:3])}"
            f"{' ...' if len(wrong) > 3 else ''}."
        )


def split_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Splits the official keys into ``unet``, ``lq_encoder`` and ``alignment`` state dicts, renamed for our modules."""
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "lq_encoder": {}, "alignment": {}}
    for key, tensor in state_dict.items():
        prefix = next((p for p in _COMPONENT_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            parts["unet"][key] = tensor
        else:
            component, ours = _COMPONENT_PREFIXES[prefix]
            parts[component][ours + key[len(prefix) :]] = tensor
    for component in ("lq_encoder", "alignment"):
        if not parts[component]:
            raise ValueError(f"The checkpoint has no {component} weights: it is not a FaithDiff checkpoint.")
    return parts


def _indices(state_dict: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))})


def alignment_config(state_dict: Mapping[str, torch.Tensor], num_attention_heads: int = RELEASE_HEADS) -> dict:
    """Alignment sizes read off its tensors (the head count is not recoverable from them: the release uses 8)."""
    try:
        lq_channels = state_dict["condition_embedding.conv_in.weight"].shape[1]
        latent_channels = state_dict["condition_embedding.conv_out.weight"].shape[0]
        hidden = state_dict["blocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"The checkpoint lacks the alignment weight {error.args[0]!r}.") from error
    return {
        "lq_channels": lq_channels,
        "latent_channels": latent_channels,
        "num_layers": len(_indices(state_dict, r"blocks\.(\d+)\.")),
        "num_attention_heads": num_attention_heads,
        "mlp_ratio": hidden // (2 * latent_channels),
    }


def lq_encoder_config(state_dict: Mapping[str, torch.Tensor], vae_config: Mapping) -> dict:
    """LQ-encoder sizes read off its tensors; block types, groups and activation follow the VAE."""
    down = _indices(state_dict, r"encoder\.down_blocks\.(\d+)\.")
    try:
        widths = [state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in down or [0]]
        in_channels = state_dict["encoder.conv_in.weight"].shape[1]
    except KeyError as error:
        raise ValueError(f"The checkpoint lacks the LQ-encoder weight {error.args[0]!r}.") from error
    return {
        "in_channels": in_channels,
        "down_block_types": list(vae_config["down_block_types"])[: len(down)],
        "block_out_channels": widths,
        "layers_per_block": len(_indices(state_dict, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        "norm_num_groups": vae_config["norm_num_groups"],
        "act_fn": vae_config["act_fn"],
        "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.") for k in state_dict),
    }


def _with_defaults(model_class: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` completed with ``model_class``'s defaults: configs written by older versions leave out the
    arguments added since."""
    parameters = inspect.signature(model_class.__init__).parameters.values()
    return {**{p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}, **config}


def check_component_sizes(configs: Mapping[str, Any]) -> None:
    """Checks that the components fit together the way the pipeline connects them, so that a mismatch is found at
    conversion rather than at the first restoration.

    Args:
        configs: ``unet``, ``vae``, ``lq_encoder`` and ``alignment`` (dicts of their init arguments), and
            ``text_encoder``, ``text_encoder_2`` (their ``CLIPTextConfig``).

    Raises:
        ValueError: naming both sides of every mismatch.
    """
    problems = _image_mismatches(configs) + _text_mismatches(configs)
    if problems:
        raise ValueError(f"The release's components do not fit together: {'; '.join(problems)}.")


def _image_mismatches(configs: Mapping[str, Any]) -> list[str]:
    unet, vae, lq, alignment = (configs[name] for name in ("unet", "vae", "lq_encoder", "alignment"))
    latent, lq_width, width = vae["latent_channels"], lq["block_out_channels"][-1], 2 * alignment["latent_channels"]
    checks = [
        (lq["in_channels"] == 3, f"the LQ encoder's conv_in takes {lq['in_channels']} channels, not RGB's 3"),
        (
            vae["in_channels"] == vae["out_channels"] == 3,
            f"the VAE maps {vae['in_channels']} to {vae['out_channels']} image channels, not RGB's 3 to 3",
        ),
        (
            len(lq["block_out_channels"]) == len(vae["block_out_channels"]),
            (
                f"the LQ encoder has {len(lq['block_out_channels'])} down blocks but the VAE "
                f"{len(vae['block_out_channels'])}: the LQ features must have the latents' resolution"
            ),
        ),
        (
            alignment["lq_channels"] == lq_width,
            (
                f"the alignment module's lq_channels ({alignment['lq_channels']}) must equal the LQ encoder's output "
                f"(mid-block) width, the last of its block_out_channels ({lq_width})"
            ),
        ),
        (
            alignment["latent_channels"] == unet["block_out_channels"][0],
            (
                f"the alignment module's latent_channels ({alignment['latent_channels']}) must equal the UNet's conv_in "
                f"output width, its block_out_channels[0] ({unet['block_out_channels'][0]})"
            ),
        ),
        (
            width % alignment["num_attention_heads"] == 0,
            (
                f"the alignment width 2 x latent_channels ({width}) must be divisible by its "
                f"{alignment['num_attention_heads']} attention heads"
            ),
        ),
        (
            unet["in_channels"] == latent,
            f"the UNet's in_channels ({unet['in_channels']}) must equal the VAE's latent_channels ({latent})",
        ),
        (
            unet["out_channels"] == latent,
            f"the UNet's out_channels ({unet['out_channels']}) must equal the VAE's latent_channels ({latent})",
        ),
    ]
    return [message for fits, message in checks if not fits]


def _text_mismatches(configs: Mapping[str, Any]) -> list[str]:
    unet, text, text_2 = configs["unet"], configs["text_encoder"], configs["text_encoder_2"]
    # SDXL concatenates the two encoders' hidden states for the cross-attention.
    hidden = text.hidden_size + text_2.hidden_size
    name = "encoder_hid_dim" if unet["encoder_hid_dim_type"] else "cross_attention_dim"
    dims = unet[name] if isinstance(unet[name], (list, tuple)) else [unet[name]]
    problems = []
    if any(dim != hidden for dim in dims):
        problems.append(
            f"the UNet's {name} ({unet[name]}) must equal text_encoder's plus text_encoder_2's hidden_size "
            f"({text.hidden_size} + {text_2.hidden_size} = {hidden})"
        )
    if unet["addition_embed_type"] != "text_time":
        problems.append(
            f"the UNet's addition_embed_type is {unet['addition_embed_type']!r}, not SDXL's 'text_time' (the pooled "
            "prompt and size conditioning)"
        )
        return problems
    time_width = _SDXL_TIME_IDS * (unet["addition_time_embed_dim"] or 0)
    if unet["projection_class_embeddings_input_dim"] != text_2.projection_dim + time_width:
        problems.append(
            f"the UNet's projection_class_embeddings_input_dim ({unet['projection_class_embeddings_input_dim']}) "
            f"must equal text_encoder_2's projection_dim plus {_SDXL_TIME_IDS} x addition_time_embed_dim "
            f"({text_2.projection_dim} + {time_width} = {text_2.projection_dim + time_width})"
        )
    return problems


def _tokenizer_problems(tokenizer: Any, text_config: Any, name: str, encoder: str) -> list[str]:
    """What would break when ``tokenizer`` feeds the text encoder of ``text_config``."""
    vocab = tokenizer.get_vocab()
    largest = max(vocab.values(), default=-1)
    problems = []
    if len(vocab) <= len(tokenizer.all_special_ids):
        problems.append(f"{name} has no vocabulary besides its special tokens (is its vocab.json missing?)")
    if largest >= text_config.vocab_size:
        problems.append(f"{name} has token ids up to {largest} but {encoder}'s vocab_size is {text_config.vocab_size}")
    if tokenizer.model_max_length > text_config.max_position_embeddings:
        # SDXL's prompt encoding pads every prompt to the tokenizer's model_max_length.
        problems.append(
            f"{name} pads prompts to {tokenizer.model_max_length} tokens but {encoder} has "
            f"{text_config.max_position_embeddings} positions (is its tokenizer_config.json missing?)"
        )
    return problems


def _listing(items: Sequence[str], limit: int = 20) -> str:
    return f"{list(items[:limit])}{' ...' if len(items) > limit else ''}"


def _build(model_class: type, config: Mapping, state_dict: Mapping[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Instantiates ``model_class`` without allocating weights and assigns ``state_dict``; every key must match."""
    import torch

    with torch.device("meta"):
        model = model_class.from_config(dict(config))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"The FaithDiff checkpoint does not match the {what}: missing keys {_listing(missing)}, "
            f"unexpected keys {_listing(unexpected)}."
        )
    wrong = [
        f"{key} {tuple(state_dict[key].shape)} instead of {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if state_dict[key].shape != tensor.shape
    ]
    if wrong:
        raise ValueError(
            f"The FaithDiff checkpoint's tensors for the {what} have the wrong shapes: {_listing(wrong, 5)}."
        )
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    return model.eval()


def _hub_reason(sources: Sequence[str]) -> str | None:
    """Why the Hub cannot be used, when some source is a repository id; ``None`` when it can or is not needed."""
    if all(os.path.exists(source) for source in sources):
        return None
    from .hub import hub_unreachable_reason

    return hub_unreachable_reason()


def _load(function: Callable[..., Any], source: str, reason: str | None = None, **kwargs: Any) -> Any:
    """``function(source, **kwargs)``. While the Hub cannot be reached (``reason``), a repository id is read from
    the local cache only, and a clear error says so when it is not there."""
    if reason is None or os.path.exists(source):
        return function(source, **kwargs)
    from .hub import unreachable_message

    try:
        return function(source, local_files_only=True, **kwargs)
    except OSError as error:
        raise ValueError(unreachable_message(source, reason, _HUB_INSTEAD)) from error


def _read_configs(parts: Mapping[str, Any], base: str, vae: str, heads: int, load: Callable) -> dict[str, Any]:
    """Every component's sizes, from the configs of ``base`` and ``vae`` and from the checkpoint's tensors."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    configs = {
        "unet": _with_defaults(UNet2DConditionModel, load(UNet2DConditionModel.load_config, base, subfolder="unet")),
        "vae": _with_defaults(AutoencoderKL, load(AutoencoderKL.load_config, vae)),
        "text_encoder": load(CLIPTextConfig.from_pretrained, base, subfolder="text_encoder"),
        "text_encoder_2": load(CLIPTextConfig.from_pretrained, base, subfolder="text_encoder_2"),
        "alignment": alignment_config(parts["alignment"], heads),
    }
    configs["lq_encoder"] = lq_encoder_config(parts["lq_encoder"], configs["vae"])
    return configs


def _text_components(base: str, configs: Mapping[str, Any], load: Callable) -> dict[str, Any]:
    """The tokenizers and text encoders of ``base``; each tokenizer must fit its encoder."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = {
        name: load(CLIPTokenizer.from_pretrained, base, subfolder=name) for name in ("tokenizer", "tokenizer_2")
    }
    problems = [
        problem
        for name, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
        for problem in _tokenizer_problems(tokenizers[name], configs[encoder], name, encoder)
    ]
    if problems:
        raise ValueError(f"The base model's tokenizers do not fit its text encoders: {'; '.join(problems)}.")
    return {
        **tokenizers,
        "text_encoder": load(CLIPTextModel.from_pretrained, base, subfolder="text_encoder"),
        "text_encoder_2": load(CLIPTextModelWithProjection.from_pretrained, base, subfolder="text_encoder_2"),
    }


def build_pipeline(
    faithdiff: str | os.PathLike,
    base: str | os.PathLike,
    vae: str | os.PathLike,
    num_attention_heads: int = RELEASE_HEADS,
) -> FaithDiffSDXLPipeline:
    """A [`FaithDiffSDXLPipeline`] from the official parts; each argument a local path or a Hub repository id.

    Every size the pipeline depends on is checked (:func:`check_component_sizes`) before any weights are loaded.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    from .alignment import FaithDiffAlignmentModel
    from .lq_features import FaithDiffLQEncoder
    from .pipeline_faithdiff_sdxl import FaithDiffSDXLPipeline

    faithdiff = _resolve_source(faithdiff, "faithdiff", folder=False)
    base, vae = _resolve_source(base, "base", folder=True), _resolve_source(vae, "vae", folder=True)
    load = partial(_load, reason=_hub_reason((faithdiff, base, vae)))
    parts = split_official_state_dict(load(load_official_checkpoint, faithdiff))
    configs = _read_configs(parts, base, vae, num_attention_heads, load)
    check_component_sizes(configs)
    scheduler_config = load(EulerDiscreteScheduler.load_config, base, subfolder="scheduler")
    return FaithDiffSDXLPipeline(
        vae=load(AutoencoderKL.from_pretrained, vae),
        unet=_build(UNet2DConditionModel, configs["unet"], parts["unet"], "SDXL UNet of the base model"),
        alignment=_build(FaithDiffAlignmentModel, configs["alignment"], parts["alignment"], "alignment module"),
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config),
        lq_encoder=_build(FaithDiffLQEncoder, configs["lq_encoder"], parts["lq_encoder"], "LQ encoder"),
        **_text_components(base, configs, load),
    )


def convert_official_release(
    faithdiff: str | os.PathLike,
    base: str | os.PathLike,
    vae: str | os.PathLike,
    output_dir: str | os.PathLike,
    variant: str | None = None,
    overwrite: bool = False,
    num_attention_heads: int = RELEASE_HEADS,
) -> Path:
    """Converts the official release to a diffusers folder loadable with ``FaithDiffSDXLPipeline.from_pretrained``,
    and with plain ``DiffusionPipeline.from_pretrained(output_dir, trust_remote_code=True)`` (diffusers' custom-code
    layout, written by ``save_pretrained``; its files only import this package).

    The folder is written under a temporary name beside ``output_dir`` (``.NAME.faithdiff-staging-XXXXXXXX``) and
    renamed when complete; what an interrupted conversion left there is removed by the next one to the same
    ``output_dir``. Two conversions to the same ``output_dir`` at once are not supported (the second removes the
    first one's staging folder; the first then fails, without writing anything). Folders and files get the mode the
    umask gives.

    Args:
        faithdiff: ``FaithDiff.bin`` (or .safetensors), a folder holding it, or a Hub repo id (jychen9811/FaithDiff).
        base: The SDXL base the release was trained from (SG161222/RealVisXL_V4.0): folder or repo id.
        vae: The decoding VAE (madebyollin/sdxl-vae-fp16-fix): folder or repo id.
        output_dir: Where to write the pipeline (created with its parents if needed).
        variant: ``"fp16"`` writes float16 weights as the diffusers ``fp16`` variant; ``None`` keeps full precision.
        overwrite: Replace an existing ``output_dir`` (otherwise an existing one is an error), which must be a
            FaithDiff pipeline folder (its ``model_index.json`` names ``FaithDiffSDXLPipeline``) or empty: a folder of
            anything else is never replaced.
        num_attention_heads: Heads of the alignment attention (8 in the release).

    Returns:
        The output folder.
    """
    output = Path(os.path.expanduser(os.fspath(output_dir)))
    _check_output(output, variant, overwrite, num_attention_heads)
    _remove_leftovers(output)
    pipe = build_pipeline(faithdiff, base, vae, num_attention_heads)
    if variant == "fp16":
        import torch

        pipe.to(torch.float16)
    _save(pipe, output, variant)
    return output


def _check_output(output: Path, variant: str | None, overwrite: bool, num_attention_heads: int) -> None:
    from .checks import check_integer

    if variant not in (None, "fp16"):
        raise ValueError(f"`variant` must be None or 'fp16', got {variant!r}.")
    check_integer(num_attention_heads, "num_attention_heads", 1)
    if output.exists() and not output.is_dir():
        raise ValueError(f"`output_dir` {str(output)!r} is a file, not a folder.")
    from .application.planning import check_output_dir

    check_output_dir(str(output))  # a parent that is a file, or a folder without write permission
    if output.is_dir() and any(output.iterdir()) and not is_faithdiff_pipeline_folder(output):
        raise ValueError(
            f"`output_dir` {str(output)!r} already exists and is not a FaithDiff pipeline folder (no model_index.json "
            "naming FaithDiffSDXLPipeline); choose another `output_dir` (folders we did not make are never replaced, "
            "`overwrite` or not)."
        )
    if output.exists() and not overwrite:
        raise ValueError(
            f"`output_dir` {str(output)!r} already exists; pass overwrite=True (--overwrite) to replace it."
        )


def is_faithdiff_pipeline_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a FaithDiff pipeline as ``save_pretrained`` writes it: a ``model_index.json`` whose
    ``_class_name`` is ``FaithDiffSDXLPipeline`` (in the custom-code layout, ``[module, "FaithDiffSDXLPipeline"]``)."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    name = index.get("_class_name") if isinstance(index, dict) else None
    if isinstance(name, list) and name:
        name = name[-1]
    return name == "FaithDiffSDXLPipeline"


def _staging_prefix(output: Path) -> str:
    return f".{output.name}.{_STAGING_MARK}"


def _retired_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.{_RETIRED_MARK}")


def _remove_leftovers(output: Path) -> None:
    """Removes what an interrupted conversion to ``output`` left beside it: its staging folders and the retired
    previous copy. Only folders named by this module for this very output are touched."""
    if not output.parent.is_dir():
        return
    prefix = _staging_prefix(output)
    # ``.NAME.old`` is the retired copy of earlier versions, which claimed that name too.
    retired = {_retired_path(output).name, f".{output.name}.old"}
    for path in output.parent.iterdir():
        ours = path.name.startswith(prefix) or path.name in retired
        if ours and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


def _save(pipe: FaithDiffSDXLPipeline, output: Path, variant: str | None) -> None:
    """Saves ``pipe`` to a staging folder beside ``output``, then moves it into place."""
    from .hub import point_modular_index

    output.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, unlike mkdtemp (0700), gives the folder the umask's mode, and the rename keeps it.
    staging = output.with_name(f"{_staging_prefix(output)}{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        pipe.save_pretrained(staging, safe_serialization=True, variant=variant)
        # The modular index names the folder its components load from: the output, not where it is written first.
        point_modular_index(staging, str(output.resolve()))
        _give_umask_modes(staging)
        _replace_folder(staging, output)
    except OSError as error:  # named by the user's folder, not by the staging folder written first
        raise ValueError(f"`output_dir` {str(output)!r} cannot be written: {error.strerror or error}") from error
    finally:
        if staging.exists():  # the save failed or was interrupted before the rename
            shutil.rmtree(staging)


def _give_umask_modes(folder: Path) -> None:
    """Gives ``folder`` and everything in it the mode the umask gives: diffusers and transformers write weights
    through temporary files, which are created 0600."""
    from .atomic_files import apply_umask

    for path in [folder, *folder.rglob("*")]:
        apply_umask(path)


def _replace_folder(new: Path, target: Path) -> None:
    """Moves ``new`` to ``target``; an old ``target`` is removed only once the new one is in place."""
    if not target.exists():
        new.rename(target)
        return
    retired = _retired_path(target)
    target.rename(retired)
    new.rename(target)
    shutil.rmtree(retired)


def release_cache_dir() -> Path:
    """Where the converted official release is kept: ``$FAITHDIFF_CACHE`` or ``~/.cache/faithdiff-pipeline``."""
    return Path(os.environ.get("FAITHDIFF_CACHE", Path.home() / ".cache" / "faithdiff-pipeline"))


def converted_release(variant: str | None = "fp16", cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted official release, converting it on first use (later calls only return the folder).

    When the Hugging Face Hub cannot be reached and the release is not in the local Hub cache, this fails within
    a few seconds with a ValueError that points to using a local converted folder instead.
    """
    folder = Path(cache_dir or release_cache_dir()) / f"FaithDiff-RealVisXL_V4.0{'-' + variant if variant else ''}"
    if not (folder / "model_index.json").is_file():
        convert_official_release(RELEASE_FAITHDIFF, RELEASE_BASE, RELEASE_VAE, folder, variant=variant, overwrite=True)
    return folder


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line of ``faithdiff-convert``, named ``prog`` in its usage and messages."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert the official FaithDiff release to a diffusers pipeline folder.",
    )
    parser.add_argument("output_dir", help="folder to write the pipeline to")
    parser.add_argument("--faithdiff", default=RELEASE_FAITHDIFF, help="FaithDiff.bin, its folder, or a Hub repo id")
    parser.add_argument("--base", default=RELEASE_BASE, help="SDXL base model folder or Hub repo id")
    parser.add_argument("--vae", default=RELEASE_VAE, help="VAE folder or Hub repo id")
    parser.add_argument("--variant", choices=["fp16"], default=None, help="write float16 weights as the fp16 variant")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--heads", type=int, default=RELEASE_HEADS, help="alignment attention heads (release: 8)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Runs ``faithdiff-convert`` with the arguments ``argv`` (default: the command line's), its usage and messages
    headed ``prog``: 0 on success, 2 with one error line, 130 when interrupted."""
    args = build_parser(prog).parse_args(argv)
    try:
        output = convert_official_release(
            args.faithdiff, args.base, args.vae, args.output_dir, args.variant, args.overwrite, args.heads
        )
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the unfinished conversion was removed", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    print(f"Wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
