"""Conversion of the official FaithDiff release (a pickled state dict + an SDXL base + a VAE) to a diffusers folder."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .alignment import FaithDiffAlignmentModel
from .lq_features import FaithDiffLQEncoder

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


def load_official_checkpoint(source: str | os.PathLike, **download: object) -> dict[str, torch.Tensor]:
    """The official state dict from a file (.bin pickle, loaded with ``weights_only=True``, or .safetensors), a
    folder holding ``FaithDiff.bin``, or a Hub repository id."""
    path = Path(source)
    if path.is_dir():
        found = [path / name for name in CHECKPOINT_NAMES if (path / name).is_file()]
        if not found:
            raise ValueError(f"`faithdiff` folder {str(path)!r} holds none of {CHECKPOINT_NAMES}.")
        path = found[0]
    elif not path.exists():
        path = Path(hf_hub_download(os.fspath(source), CHECKPOINT_NAMES[0], **download))
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError) as error:
        raise ValueError(f"`faithdiff` {str(path)!r} is not a readable PyTorch checkpoint: {error}") from error


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
        widths = [state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in down]
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


def _build(model_class: type, config: Mapping, state_dict: Mapping[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Instantiates ``model_class`` without allocating weights and assigns ``state_dict``; every key must match."""
    with torch.device("meta"):
        model = model_class.from_config(dict(config))
    expected, given = set(model.state_dict()), set(state_dict)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(
            f"The FaithDiff checkpoint does not match the {what}: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}."
        )
    try:
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"The FaithDiff checkpoint's {what} tensors have the wrong shapes: {error}") from error
    return model.eval()


def build_pipeline(
    faithdiff: str | os.PathLike,
    base: str | os.PathLike,
    vae: str | os.PathLike,
    num_attention_heads: int = RELEASE_HEADS,
):
    """A [`FaithDiffSDXLPipeline`] from the official parts; each argument a local path or a Hub repository id."""
    from .pipeline_faithdiff_sdxl import FaithDiffSDXLPipeline

    parts = split_official_state_dict(load_official_checkpoint(faithdiff))
    decoder = AutoencoderKL.from_pretrained(vae)
    unet_config = UNet2DConditionModel.load_config(base, subfolder="unet")
    return FaithDiffSDXLPipeline(
        vae=decoder,
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2"),
        unet=_build(UNet2DConditionModel, unet_config, parts["unet"], "SDXL UNet of the base model"),
        alignment=_build(
            FaithDiffAlignmentModel,
            alignment_config(parts["alignment"], num_attention_heads),
            parts["alignment"],
            "alignment module",
        ),
        scheduler=EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(base, subfolder="scheduler")),
        lq_encoder=_build(
            FaithDiffLQEncoder,
            lq_encoder_config(parts["lq_encoder"], decoder.config),
            parts["lq_encoder"],
            "LQ encoder",
        ),
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
    """Converts the official release to a diffusers folder loadable with ``FaithDiffSDXLPipeline.from_pretrained``.

    Args:
        faithdiff: ``FaithDiff.bin`` (or .safetensors), a folder holding it, or a Hub repo id (jychen9811/FaithDiff).
        base: The SDXL base the release was trained from (SG161222/RealVisXL_V4.0): folder or repo id.
        vae: The decoding VAE (madebyollin/sdxl-vae-fp16-fix): folder or repo id.
        output_dir: Where to write the pipeline. Written under a temporary name and renamed when complete.
        variant: ``"fp16"`` writes float16 weights as the diffusers ``fp16`` variant; ``None`` keeps full precision.
        overwrite: Replace an existing ``output_dir`` (otherwise an existing one is an error).
        num_attention_heads: Heads of the alignment attention (8 in the release).

    Returns:
        The output folder.
    """
    output = Path(output_dir)
    if variant not in (None, "fp16"):
        raise ValueError(f"`variant` must be None or 'fp16', got {variant!r}.")
    if output.exists() and not overwrite:
        raise ValueError(
            f"`output_dir` {str(output)!r} already exists; pass overwrite=True (--overwrite) to replace it."
        )
    if output.exists() and not output.is_dir():
        raise ValueError(f"`output_dir` {str(output)!r} is a file, not a folder.")
    pipe = build_pipeline(faithdiff, base, vae, num_attention_heads)
    if variant == "fp16":
        pipe.to(torch.float16)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True, variant=variant)
        _replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _replace_folder(new: Path, target: Path) -> None:
    """Moves ``new`` to ``target``; an old ``target`` is removed only once the new one is in place."""
    if not target.exists():
        new.rename(target)
        return
    retired = target.with_name(f".{target.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    target.rename(retired)
    new.rename(target)
    shutil.rmtree(retired)


def release_cache_dir() -> Path:
    """Where the converted official release is kept: ``$FAITHDIFF_CACHE`` or ``~/.cache/faithdiff-pipeline``."""
    return Path(os.environ.get("FAITHDIFF_CACHE", Path.home() / ".cache" / "faithdiff-pipeline"))


def converted_release(variant: str | None = "fp16", cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted official release, converting it on first use (later calls only return the folder)."""
    folder = Path(cache_dir or release_cache_dir()) / f"FaithDiff-RealVisXL_V4.0{'-' + variant if variant else ''}"
    if not (folder / "model_index.json").is_file():
        convert_official_release(RELEASE_FAITHDIFF, RELEASE_BASE, RELEASE_VAE, folder, variant=variant, overwrite=True)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="faithdiff-convert",
        description="Convert the official FaithDiff release to a diffusers pipeline folder.",
    )
    parser.add_argument("output_dir", help="folder to write the pipeline to")
    parser.add_argument("--faithdiff", default=RELEASE_FAITHDIFF, help="FaithDiff.bin, its folder, or a Hub repo id")
    parser.add_argument("--base", default=RELEASE_BASE, help="SDXL base model folder or Hub repo id")
    parser.add_argument("--vae", default=RELEASE_VAE, help="VAE folder or Hub repo id")
    parser.add_argument("--variant", choices=["fp16"], default=None, help="write float16 weights as the fp16 variant")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--heads", type=int, default=RELEASE_HEADS, help="alignment attention heads (release: 8)")
    args = parser.parse_args(argv)
    try:
        output = convert_official_release(
            args.faithdiff, args.base, args.vae, args.output_dir, args.variant, args.overwrite, args.heads
        )
    except (ValueError, OSError) as error:
        print(f"faithdiff-convert: error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
