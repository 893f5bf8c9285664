"""Seconds per image and peak GPU memory of FaithDiffSDXLPipeline on random weights, optionally beside another
FaithDiff pipeline module (such as the diffusers community pipeline) timed in the same process.

    python benchmarks/benchmark.py --config ../shared/bench/sdxl_configs.json --sizes 1024 2048 \
        --tile-batch-size 1 9 --compile --anchor path/to/pipeline_faithdiff_stable_diffusion_xl.py

Every measurement is printed as one JSON line (and appended to ``--output`` if given). Timing does not depend on the
weights' values, so no download is needed. Output sizes are the upscaled size: each run restores an image of half
that size with ``upscale=2``, 20 Euler steps, CFG 5, ``start_point="lr"`` and 1024-px latent tiles by default.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import PIL.Image
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from faithdiff_pipeline import FaithDiffAlignmentModel, FaithDiffLQEncoder, FaithDiffSDXLPipeline  # noqa: E402
from faithdiff_pipeline.image_io import read_image  # noqa: E402

PROMPT = "A detailed photograph of an old stone house by a lake, soft evening light."


def synthetic_tokenizer(vocab_size: int, bos: int, eos: int) -> CLIPTokenizer:
    """A CLIP tokenizer over single characters (no download); special tokens keep the text encoder's ids."""
    vocab: dict[str, int] = {}
    for code in range(33, 127):
        for token in (chr(code), chr(code) + "</w>"):
            vocab[token] = len(vocab)
    assert len(vocab) < min(bos, eos, vocab_size)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = bos, eos
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_components(config_path: Path, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Random-weight components from a config file (the layout of ../shared/bench/sdxl_configs.json)."""
    config = json.loads(config_path.read_text())
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"]))
        vae = AutoencoderKL(**config["vae"])
        unet_config = config["unet"]
        components = dict(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            unet_config=unet_config,
            lq_encoder=FaithDiffLQEncoder.from_vae(vae),
            alignment=FaithDiffAlignmentModel(
                lq_channels=config["vae"]["block_out_channels"][-1],
                latent_channels=unet_config["block_out_channels"][0],
            ),
        )
    for name in ("vae", "text_encoder", "text_encoder_2", "lq_encoder", "alignment"):
        components[name] = components[name].to(dtype=dtype).eval()
    text = config["text_encoder"]
    components["tokenizer"] = synthetic_tokenizer(text["vocab_size"], text["bos_token_id"], text["eos_token_id"])
    components["tokenizer_2"] = components["tokenizer"]
    components["scheduler"] = EulerDiscreteScheduler(**config["scheduler"])
    return components


def build_unet(
    config: dict, device: str, dtype: torch.dtype, unet_class: type = UNet2DConditionModel
) -> torch.nn.Module:
    with torch.device(device):
        unet = unet_class(**config)
    return unet.to(dtype=dtype).eval()


def lq_input(size: int, sample: Path | None) -> PIL.Image.Image:
    """The half-size input for a ``size`` output: a real photo if given, else smooth random structure."""
    if sample is not None:
        return read_image(sample).to_pil().resize((size // 2, size // 2), PIL.Image.LANCZOS)
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return PIL.Image.fromarray(coarse).resize((size // 2, size // 2), PIL.Image.BICUBIC)


@contextmanager
def measured(device: str) -> Iterator[dict[str, float]]:
    """Wall time (synchronised) and peak allocated GPU memory of the enclosed code."""
    result: dict[str, float] = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield result
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    result["seconds"] = round(time.perf_counter() - start, 3)


def environment(device: str) -> dict[str, str]:
    info = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
    }
    return info


def time_runs(run: Callable[[int], Any], device: str, warmup_steps: int, repeats: int, steps: int) -> tuple[dict, Any]:
    """One warm-up call (compiles, allocates) with ``warmup_steps``, then the best of ``repeats`` timed calls."""
    if warmup_steps:
        run(warmup_steps)
    best: dict[str, float] | None = None
    output = None
    for _ in range(repeats):
        with measured(device) as result:
            output = run(steps)
        best = result if best is None or result["seconds"] < best["seconds"] else best
    return best, output


@contextmanager
def stage_timers(pipe: FaithDiffSDXLPipeline, device: str) -> Iterator[dict[str, float]]:
    """Within the context, each call of a pipeline stage adds its synchronised wall time to the yielded dict."""
    totals: dict[str, float] = {}
    names = ("encode_prompt", "lq_features", "prepare_latents", "predict_noise", "decode_latents")

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(method: Callable, name: str) -> Callable:
        def wrapper(*args, **kwargs):
            sync()
            start = time.perf_counter()
            output = method(*args, **kwargs)
            sync()
            totals[name] = round(totals.get(name, 0.0) + time.perf_counter() - start, 4)
            return output

        return wrapper

    for name in names:
        setattr(pipe, name, timed(getattr(pipe, name), name))
    try:
        yield totals
    finally:
        for name in names:
            delattr(pipe, name)


def restore(pipe: FaithDiffSDXLPipeline, image: PIL.Image.Image, args: argparse.Namespace, tiles: int, steps: int):
    return pipe(
        image,
        prompt=PROMPT,
        upscale=2,
        num_inference_steps=steps,
        guidance_scale=5.0,
        start_point="lr",
        tile_size=args.tile_size,
        tile_batch_size=tiles,
        output_type="pt",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images


def exact_outputs(pipe: FaithDiffSDXLPipeline, args: argparse.Namespace) -> dict[int, torch.Tensor]:
    """The exact path's images at every size (eager, on the device), kept on the host."""
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    outputs = {}
    for size in args.sizes:
        pipe.vae.enable_tiling() if size >= args.vae_tiling_from else pipe.vae.disable_tiling()
        outputs[size] = restore(pipe, lq_input(size, args.sample), args, args.tile_batch_size[0], args.steps).cpu()
    return outputs


def deviation(output: torch.Tensor, exact: torch.Tensor | None) -> dict[str, float]:
    """Max abs difference and PSNR (dB, images in [0, 1]) against the exact path."""
    if exact is None:
        return {}
    difference = output.float().cpu() - exact.float()
    mse = float(difference.square().mean())
    psnr = float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))
    return {"max_abs_vs_exact": round(float(difference.abs().max()), 6), "psnr_vs_exact": round(psnr, 2)}


def run_ours(args: argparse.Namespace, components: dict, emit: Callable[[dict], None]) -> None:
    dtype = getattr(torch, args.dtype)
    unet = build_unet(components["unet_config"], args.device, dtype)
    if args.fuse_qkv:
        unet.fuse_qkv_projections()
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    parts = {k: v for k, v in components.items() if k != "unet_config"}
    pipe = FaithDiffSDXLPipeline(unet=unet, **parts)
    # Float8 changes the weights for good: the exact outputs to measure its deviation against come first.
    exact = exact_outputs(pipe, args) if args.fp8 != "none" or args.low_vram else {}
    if args.low_vram:
        pipe.enable_low_vram(args.device)
    elif args.offload == "model":
        pipe.enable_model_cpu_offload(device=args.device)
    elif args.offload == "text-encoders":
        pipe.enable_text_encoder_offload(args.device)
    else:
        pipe.to(args.device)
    if args.fp8 == "weights" and not args.low_vram:
        pipe.enable_fp8_weights()
    elif args.fp8 == "compute":
        pipe.enable_fp8_compute()
    pipe.set_progress_bar_config(disable=True)
    # Static shapes: each output size gets its own specialised graph instead of one dynamic graph for all sizes.
    options = dict(fullgraph=True, dynamic=False, mode=None if args.compile_mode == "default" else args.compile_mode)
    if args.compile == "regional":
        pipe.unet.compile_repeated_blocks(**options)
    elif args.compile == "full":
        pipe.unet = torch.compile(pipe.unet, **options)
    reference = {}
    for size in args.sizes:
        tiled_vae = size >= args.vae_tiling_from
        pipe.vae.enable_tiling() if tiled_vae else pipe.vae.disable_tiling()
        image = lq_input(size, args.sample)
        for tile_batch_size in args.tile_batch_size:

            def run(steps: int) -> torch.Tensor:
                return restore(pipe, image, args, tile_batch_size, steps)

            result, output = time_runs(run, args.device, args.warmup_steps, args.repeats, args.steps)
            if args.breakdown:
                with stage_timers(pipe, args.device) as stages:
                    run(args.steps)
                result["stages"] = stages
            first = reference.setdefault(size, output)
            emit(
                {
                    "pipeline": "faithdiff_pipeline",
                    "size": size,
                    "tile_batch_size": tile_batch_size,
                    "dtype": args.dtype,
                    "compile": args.compile,
                    "compile_mode": args.compile_mode,
                    "fuse_qkv": args.fuse_qkv,
                    "channels_last": args.channels_last,
                    "offload": args.offload,
                    "vae_tiling": tiled_vae,
                    "steps": args.steps,
                    **result,
                    "fp8": args.fp8,
                    "low_vram": args.low_vram,
                    "max_abs_diff_vs_first_tile_batch_size": round(
                        float((output.float() - first.float()).abs().max()), 6
                    ),
                    **deviation(output, exact.get(size)),
                }
            )


def load_anchor(path: Path):
    """The module of another FaithDiff pipeline. It must expose ``FaithDiffStableDiffusionXLPipeline`` and a UNet class
    ``UNet2DConditionModel`` with ``load_additional_layers(weight_path=None, dtype=...)``, as the diffusers community
    pipeline (examples/community/pipeline_faithdiff_stable_diffusion_xl.py) does."""
    spec = importlib.util.spec_from_file_location("faithdiff_anchor", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"`--anchor` {str(path)!r} is not a Python module.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("FaithDiffStableDiffusionXLPipeline", "UNet2DConditionModel"):
        if not hasattr(module, name):
            raise ValueError(f"`--anchor` module {str(path)!r} defines no `{name}`.")
    return module


def set_anchor_tiling(pipe: Any, enabled: bool) -> None:
    """VAE tiling for the anchor, its LQ encoder (``unet.denoise_encoder``) included, as its ``enable_vae_tiling``
    would do; that wrapper itself raises a deprecation error under diffusers >= 0.40."""
    encoder = getattr(pipe.unet, "denoise_encoder", None)
    if enabled:
        pipe.set_encoder_tile_settings()
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()
    if encoder is not None:
        encoder.use_tiling = enabled


def run_anchor(args: argparse.Namespace, components: dict, emit: Callable[[dict], None]) -> None:
    dtype = getattr(torch, args.dtype)
    module = load_anchor(args.anchor)
    unet = build_unet(components["unet_config"], args.device, dtype, module.UNet2DConditionModel)
    unet.load_additional_layers(weight_path=None, dtype=dtype)
    parts = {
        k: components[k] for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    }
    pipe = module.FaithDiffStableDiffusionXLPipeline(unet=unet, **parts).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    for size in args.sizes:
        tiled_vae = size >= args.vae_tiling_from
        set_anchor_tiling(pipe, tiled_vae)
        image = lq_input(size, args.sample).resize((size, size), PIL.Image.LANCZOS)

        def run(steps: int):
            return pipe(
                lr_img=image,
                prompt=PROMPT,
                negative_prompt="",
                num_inference_steps=steps,
                guidance_scale=5.0,
                generator=torch.Generator(args.device).manual_seed(0),
                start_point="lr",
                height=size,
                width=size,
                overlap=0.5,
                target_size=(args.tile_size, args.tile_size),
            ).images

        result, _ = time_runs(run, args.device, args.warmup_steps, args.repeats, args.steps)
        emit(
            {
                "pipeline": f"anchor:{args.anchor.name}",
                "size": size,
                "dtype": args.dtype,
                "vae_tiling": tiled_vae,
                "steps": args.steps,
                **result,
            }
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="component configs (sdxl_configs.json layout)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="output sizes in pixels (square)")
    parser.add_argument("--tile-batch-size", type=int, nargs="+", default=[1], help="tile batch sizes to try")
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed first call (0: none)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per setting; the fastest is reported")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vae-tiling-from", type=int, default=2048, help="enable VAE tiling from this size on")
    parser.add_argument(
        "--compile",
        choices=["none", "regional", "full"],
        default="none",
        help="torch.compile the UNet's repeated transformer blocks (regional) or the whole UNet",
    )
    parser.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        default="default",
        help="torch.compile mode; reduce-overhead replays each UNet call as one CUDA graph",
    )
    parser.add_argument(
        "--offload",
        choices=["none", "model", "text-encoders"],
        default="none",
        help="model CPU offload, or the text encoders alone (pipe.enable_text_encoder_offload)",
    )
    parser.add_argument(
        "--fp8",
        choices=["none", "weights", "compute"],
        default="none",
        help="float8 UNet weights (layerwise casting) or float8 compute (torchao); reports the deviation from exact",
    )
    parser.add_argument(
        "--low-vram", action="store_true", help="pipe.enable_low_vram(): float8 storage, text encoders offloaded, tiling"
    )
    parser.add_argument("--breakdown", action="store_true", help="also time each stage of the pipeline")
    parser.add_argument("--fuse-qkv", action="store_true", help="fuse the UNet's attention projections")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--anchor", type=Path, help="another FaithDiff pipeline module to time in the same process")
    parser.add_argument("--skip-ours", action="store_true", help="time only the anchor")
    parser.add_argument("--sample", type=Path, help="a photo to use as input (default: synthetic)")
    parser.add_argument("--output", type=Path, help="append the JSON lines to this file too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if args.output:
            with args.output.open("a") as handle:
                handle.write(line + "\n")

    emit({"environment": environment(args.device)})
    components = build_components(args.config, args.device, dtype)
    if args.anchor:
        run_anchor(args, components, emit)
        gc.collect()
        torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    if not args.skip_ours:
        run_ours(args, components, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
