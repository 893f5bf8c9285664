"""``faithdiff-upscale``: restore files, folders or globs of photos, resumably, on one device or several."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import PIL.Image
import PIL.PngImagePlugin
import torch

from .atomic_files import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_MODES = ("auto", "none", "sidecar")


class UsageError(ValueError):
    """A mistake in the command line: reported in one line, before any model is loaded."""


@dataclass
class Summary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def report(self) -> str:
        per_image = f", {self.seconds / len(self.done):.1f} s per image" if self.done else ""
        lines = [
            f"{len(self.done)} done, {len(self.skipped)} skipped (already restored), {len(self.failed)} failed{per_image}"
        ]
        lines += [f"  failed: {name}: {reason}" for name, reason in self.failed]
        return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faithdiff-upscale",
        description="Restore and upscale photos with FaithDiff. Finished images are skipped on a rerun.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, or glob patterns")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("faithdiff-restored"), help="where results go")
    parser.add_argument(
        "--model", help="converted pipeline folder or Hub id (default: the official release, converted on first use)"
    )
    parser.add_argument("--upscale", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--start-point", choices=["lr", "noise"], default="lr")
    parser.add_argument("--tile-size", type=int, default=1024, help="latent tile size in pixels")
    parser.add_argument("--tile-stride", type=int, help="tile stride in pixels (default: half a tile)")
    parser.add_argument("--tile-batch-size", type=int, default=4, help="tiles per UNet call")
    parser.add_argument("--color-fix", choices=["adain", "wavelet", "none"], default="adain")
    parser.add_argument(
        "--caption",
        choices=CAPTION_MODES,
        default="auto",
        help="auto: sidecar if present, else the captioner if given, else no prompt; "
        "sidecar: every image needs IMAGE.json; none: no prompt",
    )
    parser.add_argument("--prompt", help="one fixed prompt for every image (instead of captions)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--captioner", help="captioning model id or folder, e.g. llava-hf/llava-1.5-13b-hf")
    parser.add_argument(
        "--captioner-quantization", choices=["8bit", "4bit"], help="load the captioner quantised (bitsandbytes)"
    )
    parser.add_argument(
        "--write-captions", action="store_true", help="save new captions as JSON sidecars beside the inputs"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto")
    parser.add_argument(
        "--offload",
        choices=["none", "text-encoders", "model", "sequential"],
        default="none",
        help="keep models in host memory: text-encoders (costs ~0.15 s per image), model or sequential (slow)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (CUDA graphs on CUDA); compiles once per tile layout, so it pays off over many "
        "images of one size",
    )
    parser.add_argument("--vae-tiling", action="store_true", help="tile the VAE and LQ encoder (large images)")
    parser.add_argument(
        "--captions-only",
        action="store_true",
        help="only write caption sidecars (IMAGE.json) with --captioner, for images that have none; restore nothing",
    )
    parser.add_argument("--compare", action="store_true", help="also write NAME_compare.png: LANCZOS | restored")
    parser.add_argument("--overwrite", action="store_true", help="restore again even where a result exists")
    return parser


def collect_inputs(patterns: Sequence[str]) -> list[Path]:
    """Image paths from files, folders (their images, sorted) and glob patterns; mistakes raise UsageError."""
    found: list[Path] = []
    for pattern in patterns:
        if any(char in pattern for char in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise UsageError(f"no images match {pattern!r}")
            found += matches
            continue
        path = Path(pattern)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise UsageError(f"folder {pattern!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found += images
        elif not path.exists():
            raise UsageError(f"input {pattern!r} does not exist")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UsageError(f"input {pattern!r} is not a supported image ({', '.join(IMAGE_SUFFIXES)})")
        else:
            found.append(path)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    stems: dict[str, Path] = {}
    for path in unique:
        if path.stem in stems:
            raise UsageError(f"{stems[path.stem]} and {path} would both be written as {path.stem}.png; rename one")
        stems[path.stem] = path
    return unique


def check_arguments(args: argparse.Namespace) -> None:
    if args.prompt is not None and args.caption != "auto":
        raise UsageError(f"--prompt gives a fixed prompt; it conflicts with --caption {args.caption}")
    if args.prompt is not None and args.captioner:
        raise UsageError("--prompt gives a fixed prompt; it conflicts with --captioner")
    if args.captioner_quantization and not args.captioner:
        raise UsageError("--captioner-quantization needs --captioner")
    if args.compile and args.offload in ("model", "sequential"):
        raise UsageError(f"--compile keeps the UNet on the device; use --offload text-encoders, not {args.offload}")
    if args.captions_only and not args.captioner:
        raise UsageError("--captions-only needs --captioner")
    if args.upscale <= 0:
        raise UsageError(f"--upscale must be > 0, got {args.upscale}")
    if args.steps < 1 or args.tile_batch_size < 1:
        raise UsageError("--steps and --tile-batch-size must be at least 1")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise UsageError(f"output directory {str(args.output_dir)!r} is a file")


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    return torch.float32 if device.type == "cpu" else torch.float16


def load_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from .captioning import load_captioner
    from .conversion import converted_release
    from .pipeline_faithdiff_sdxl import FaithDiffSDXLPipeline

    extra: dict[str, Any] = {}
    if args.captioner:
        captioner = load_captioner(args.captioner, args.captioner_quantization, dtype=dtype)
        extra = {"captioner": captioner.model, "captioner_processor": captioner.processor}
    variant = "fp16" if dtype == torch.float16 else None
    model = args.model or converted_release(variant=variant)
    pipe = FaithDiffSDXLPipeline.from_pretrained(model, dtype=dtype, variant=None if args.model else variant, **extra)
    if args.offload == "text-encoders":
        pipe.enable_text_encoder_offload(device)
    elif args.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.compile:
        # Static shapes: a new image size gets its own specialised graph instead of a slower dynamic one.
        mode = "reduce-overhead" if device.type == "cuda" else None
        pipe.unet.compile(fullgraph=True, dynamic=False, mode=mode)
    return pipe


def prompt_for(path: Path, image: PIL.Image.Image, args: argparse.Namespace, pipe: Any) -> str:
    """The prompt of one image, following --prompt / --caption."""
    from .captioning import Captioner, clean_caption, read_caption, write_caption

    if args.prompt is not None:
        return args.prompt
    if args.caption == "none":
        return ""
    stored = read_caption(path)
    if stored is not None:
        return stored
    if args.caption == "sidecar":
        raise ValueError(f"no caption sidecar {path.with_suffix('.json').name}")
    if pipe.captioner is None:
        return ""
    captioner = Captioner(pipe.captioner, pipe.captioner_processor)
    raw = captioner.raw_captions([image], seed=args.seed)[0]
    if args.write_captions:
        write_caption(path, raw)
    return clean_caption(raw)


def save_png(image: PIL.Image.Image, target: Path, metadata: dict[str, str]) -> None:
    """Writes ``image`` with ``metadata`` in PNG text chunks under a temporary name, then renames it."""
    info = PIL.PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    with atomic_path(target) as temporary:
        image.save(temporary, format="PNG", pnginfo=info)


def side_by_side(lq: PIL.Image.Image, restored: PIL.Image.Image) -> PIL.Image.Image:
    upscaled = lq.convert("RGB").resize(restored.size, PIL.Image.LANCZOS)
    canvas = PIL.Image.new("RGB", (restored.width * 2, restored.height))
    canvas.paste(upscaled, (0, 0))
    canvas.paste(restored, (restored.width, 0))
    return canvas


def restore_one(path: Path, args: argparse.Namespace, pipe: Any) -> None:
    from . import __version__

    try:
        with PIL.Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"not a readable image ({error})") from error
    prompt = prompt_for(path, image, args, pipe)
    result = pipe(
        image,
        prompt=prompt,
        negative_prompt=args.negative_prompt,
        upscale=args.upscale,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        start_point=args.start_point,
        tile_size=args.tile_size,
        tile_stride=args.tile_stride,
        tile_batch_size=args.tile_batch_size,
        color_fix=None if args.color_fix == "none" else args.color_fix,
        generator=torch.Generator("cpu").manual_seed(args.seed),
    ).images[0]
    parameters = {
        "input": path.name,
        "prompt": prompt,
        "negative_prompt": args.negative_prompt,
        "upscale": args.upscale,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "start_point": args.start_point,
        "tile_size": args.tile_size,
        "tile_stride": args.tile_stride,
        "color_fix": args.color_fix,
        "model": args.model or "official release",
        "faithdiff_pipeline": __version__,
    }
    metadata = {"parameters": json.dumps(parameters), "caption": prompt}
    if args.compare:
        save_png(side_by_side(image, result), args.output_dir / f"{path.stem}_compare.png", metadata)
    save_png(result, args.output_dir / f"{path.stem}.png", metadata)


def run(paths: list[Path], args: argparse.Namespace, pipe: Any, progress: bool = True) -> Summary:
    from tqdm.auto import tqdm

    summary = Summary()
    todo = []
    for path in paths:
        if (args.output_dir / f"{path.stem}.png").exists() and not args.overwrite:
            summary.skipped.append(path.name)
        else:
            todo.append(path)
    start = time.perf_counter()
    for path in tqdm(todo, desc="images", unit="image", disable=not progress):
        try:
            restore_one(path, args, pipe)
        except (ValueError, TypeError, OSError, RuntimeError) as error:
            summary.failed.append((path.name, str(error).splitlines()[0] if str(error) else type(error).__name__))
            continue
        summary.done.append(path.name)
    summary.seconds = time.perf_counter() - start
    return summary


def write_missing_captions(paths: list[Path], args: argparse.Namespace, device: torch.device) -> Summary:
    """Captions the images that have no sidecar yet and writes their sidecars; loads only the captioner."""
    from tqdm.auto import tqdm

    from .captioning import load_captioner, read_caption, write_caption

    captioner = load_captioner(
        args.captioner, args.captioner_quantization, device=device, dtype=resolve_dtype(args.dtype, device)
    )
    summary, start = Summary(), time.perf_counter()
    for path in tqdm(paths, desc="captions", unit="image"):
        if read_caption(path) is not None and not args.overwrite:
            summary.skipped.append(path.name)
            continue
        try:
            with PIL.Image.open(path) as opened:
                image = opened.convert("RGB")
            write_caption(path, captioner.raw_captions([image], seed=args.seed)[0])
        except (OSError, ValueError) as error:
            summary.failed.append((path.name, str(error).splitlines()[0]))
            continue
        summary.done.append(path.name)
    summary.seconds = time.perf_counter() - start
    return summary


def _process_share(paths: list[Path], device: str) -> tuple[list[Path], torch.device | None]:
    """Under ``accelerate launch`` (or torchrun) with several processes, this process's share of the inputs and its
    device, split by accelerate itself."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return paths, None
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    with state.split_between_processes(paths) as share:
        return list(share), state.device


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        paths = collect_inputs(args.inputs)
    except UsageError as error:
        print(f"faithdiff-upscale: error: {error}", file=sys.stderr)
        return 2
    paths, process_device = _process_share(paths, args.device)
    device = process_device or resolve_device(args.device)
    if args.captions_only:
        summary = write_missing_captions(paths, args, device)
        print(summary.report())
        return 1 if summary.failed else 0
    args.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        pipe = load_pipeline(args, device, resolve_dtype(args.dtype, device))
    except (ValueError, OSError) as error:
        print(f"faithdiff-upscale: error: could not load the pipeline: {error}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(leave=False, desc="steps")
    try:
        summary = run(paths, args, pipe)
    except KeyboardInterrupt:
        print("faithdiff-upscale: interrupted; finished images are kept, rerun to continue", file=sys.stderr)
        return 130
    print(summary.report())
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
