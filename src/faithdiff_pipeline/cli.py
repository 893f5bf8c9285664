"""``faithdiff-upscale``: restore files, folders or globs of photos, resumably, on one device or several."""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .image_io import (
    DEFAULT_MAX_OUTPUT_PIXELS,
    OUTPUT_FORMATS,
    PROFILE_CHOICES,
    READABLE_SUFFIXES,
    SIXTEEN_BIT_INSTALL,
    OutputOptions,
    needs_sixteen_bit_extra,
    read_image,
    result_text,
    save_result,
)
from .loading import CAPTIONER_PRECISIONS, check_model_source, check_options
from .restoration_settings import RestorationSettings

if TYPE_CHECKING:
    import PIL.Image
    import torch

# torch and diffusers are imported where they are used: `--help` and every usage error answer at once.
PROG = "faithdiff-upscale"
IMAGE_SUFFIXES = READABLE_SUFFIXES
CAPTION_MODES = ("auto", "none", "sidecar")
_NAMES_SHOWN = 5


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


@dataclass(frozen=True)
class Job:
    """One input and the files it gives."""

    source: Path
    result: Path
    compare: Path | None = None

    @property
    def targets(self) -> list[Path]:
        return [self.result] + ([self.compare] if self.compare else [])


def add_restoration_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every command that restores: the model, sampling, tiles, captions, device and precision."""
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
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_OUTPUT_PIXELS,
        help=f"largest result (width x height) accepted (default {DEFAULT_MAX_OUTPUT_PIXELS} = 8192x8192)",
    )
    parser.add_argument(
        "--caption",
        choices=CAPTION_MODES,
        default="auto",
        help="auto: the sidecar IMAGE.json if present, else a caption by the captioner (written as the sidecar), "
        "else no prompt; sidecar: every image needs IMAGE.json; none: no prompt",
    )
    parser.add_argument("--prompt", help="one fixed prompt for every image (instead of captions)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument(
        "--captioner",
        default="auto",
        help="auto (default): the release's llava-hf/llava-1.5-13b-hf on a CUDA GPU (about 28 GiB in half precision, "
        "16 in 8-bit, 9 in 4-bit: the first that fits the free memory), no captions without one; "
        "llava-hf/llava-1.5-7b-hf needs about 15 / 8.5 / 5.5 GiB; any LLaVA-family id or folder; none: no captions. "
        "Images are all captioned first, then the captioner leaves the GPU before restoration starts",
    )
    parser.add_argument(
        "--captioner-quantization",
        choices=["auto", *CAPTIONER_PRECISIONS],
        default="auto",
        help="captioner precision: auto (by free GPU memory), half, 8bit or 4bit (bitsandbytes, the [caption] extra)",
    )
    parser.add_argument(
        "--preclean",
        metavar="MODEL_FILE",
        help="a restoration network (BSRNet, Real-ESRGAN, SwinIR, ...; .pth or .safetensors, loaded by spandrel: the "
        "[preclean] extra) that cleans what the captioner sees, as the release's --use_bsrnet; restoration still "
        "starts from the original",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto")
    parser.add_argument(
        "--offload",
        choices=["none", "text-encoders", "model", "sequential"],
        default="none",
        help="keep models in host memory, moved to the device as they run: text-encoders (the two text encoders, "
        "streamed in once per image), model (each model in turn) or sequential (layer by layer, slowest)",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="regional",
        default="none",
        choices=["none", "regional", "full"],
        help="torch.compile the UNet: regional (the default of --compile: its repeated blocks, quick to compile) or "
        "full (the whole UNet, CUDA graphs on CUDA); compiled code is cached on disk for later runs",
    )
    parser.add_argument(
        "--fp8",
        choices=["none", "weights", "compute"],
        default="none",
        help="float8 UNet (opt-in; the output deviates from the release's, see benchmarks/RESULTS.md): weights "
        "(stored in float8, computed in --dtype, half the UNet memory, any device) or compute (float8 matrix "
        "products, GPUs of compute capability 8.9+, the [fp8] extra; combine with --compile)",
    )
    parser.add_argument(
        "--low-vram",
        action="store_true",
        help="the release's 5 GB set-up: float8 weights, text encoders offloaded, VAE/LQ-encoder tiling, one tile "
        "per UNet call",
    )
    parser.add_argument("--vae-tiling", action="store_true", help="tile the VAE and LQ encoder (large images)")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line of ``faithdiff-upscale``, named ``prog`` in its usage and messages."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Restore and upscale photos with FaithDiff. Finished images are skipped on a rerun; inputs are "
        "never overwritten.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, or glob patterns")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("faithdiff-restored"), help="where results go")
    add_restoration_arguments(parser)
    parser.add_argument(
        "--captions-only",
        action="store_true",
        help="only write caption sidecars (IMAGE.json) for images that have none; restore nothing",
    )
    files = parser.add_argument_group("result files")
    files.add_argument("--format", choices=list(OUTPUT_FORMATS), default="png", help="file format of the results")
    files.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality, 1-100 (default 95)")
    files.add_argument(
        "--bit-depth",
        choices=["auto", "8", "16"],
        default="auto",
        help="auto: 16-bit where the input was (PNG and TIFF results), else 8",
    )
    files.add_argument(
        "--keep-colour",
        action="store_true",
        help="write the results of greyscale inputs in colour (default: greyscale, the luminance of the result)",
    )
    files.add_argument(
        "--profile",
        choices=PROFILE_CHOICES,
        default="srgb",
        help="srgb: results in sRGB with an sRGB profile; source: converted back to the input's embedded profile",
    )
    files.add_argument("--compare", action="store_true", help="also write NAME_compare.png: LANCZOS | restored")
    files.add_argument(
        "--overwrite", action="store_true", help="restore again where a result of ours exists (never an input)"
    )
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local (default): this process, or each process of `accelerate launch`; ray: a pool of Ray Data "
        "workers on this machine or a cluster, inputs and outputs local or URIs such as s3://bucket/prefix (the "
        "[ray] extra)",
    )
    engine.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="the Ray cluster to join, e.g. ray://head:10001 (default: RAY_ADDRESS, else a cluster running on this "
        "machine, else a new one)",
    )
    engine.add_argument(
        "--workers", type=int, metavar="N", help="Ray workers, each loading the pipeline once (default 1)"
    )
    engine.add_argument(
        "--gpus-per-worker",
        type=float,
        metavar="G",
        help="GPUs reserved per Ray worker, fractions share one (default: 1 where the cluster has GPUs, else 0)",
    )
    return parser


def collect_inputs(patterns: Sequence[str]) -> list[Path]:
    """Image paths from files, folders (their images, sorted) and glob patterns; mistakes raise UsageError.

    A path that exists is taken literally, even with ``*?[`` in its name."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if not path.exists() and any(char in pattern for char in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise UsageError(f"no images match {pattern!r}")
            found += matches
        elif path.is_dir():
            images = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name[0] != "."
            )
            if not images:
                raise UsageError(f"folder {pattern!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found += images
        elif not path.exists():
            raise UsageError(f"input {pattern!r} does not exist")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UsageError(f"input {pattern!r} is not a supported image ({', '.join(IMAGE_SUFFIXES)})")
        else:
            found.append(path)
    return list(dict.fromkeys(p.resolve() for p in found))


def _names(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_NAMES_SHOWN])
    return shown + (f"; and {len(items) - _NAMES_SHOWN} more" if len(items) > _NAMES_SHOWN else "")


def plan_jobs(paths: list[Path], output_dir: Path, suffix: str, compare: bool) -> list[Job]:
    """The result files of every input in ``output_dir``, named with ``suffix`` (and ``NAME_compare.png`` with
    ``compare``); refuses, before any work, results that would share a name or replace an input file."""
    out = output_dir.resolve()
    jobs = [
        Job(path, out / f"{path.stem}{suffix}", out / f"{path.stem}_compare.png" if compare else None)
        for path in paths
    ]
    writers: dict[Path, list[Path]] = {}
    for job in jobs:
        for target in job.targets:
            writers.setdefault(target, []).append(job.source)
    clashes = [
        f"{' and '.join(str(p) for p in sources)} would both be written as {target.name}"
        for target, sources in writers.items()
        if len(sources) > 1
    ]
    if clashes:
        raise UsageError(f"results would clash: {_names(clashes)}; rename the inputs or split the job")
    inputs = set(paths)
    replaced = [str(target) for target in writers if target in inputs]
    if replaced:
        raise UsageError(
            f"results would replace input files: {_names(replaced)}; choose another --output-dir (inputs are never "
            "overwritten, --overwrite or not)"
        )
    return jobs


def sort_jobs(jobs: list[Job], overwrite: bool) -> tuple[list[Job], list[Job]]:
    """``(todo, skipped)``. A result that exists is skipped only if it is one of ours (our metadata); any other file
    in a result's place is a clash, reported before any work."""
    foreign = [str(t) for job in jobs for t in job.targets if t.exists() and result_text(t) is None]
    if foreign:
        raise UsageError(
            f"files that are not faithdiff results are in the way: {_names(foreign)}; move them or choose another "
            "--output-dir"
        )
    skipped = [job for job in jobs if job.result.exists() and not overwrite]
    return [job for job in jobs if job not in skipped], skipped


def _finite(value: float, flag: str) -> None:
    if not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value}")


def _check_output_dir(folder: Path) -> None:
    """An output folder that cannot be created is a usage error; it is created only once the model has loaded, so
    that a failed load leaves nothing behind."""
    if folder.exists():
        if not folder.is_dir():
            raise UsageError(f"output directory {str(folder)!r} is a file")
        return
    parent = folder.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"output directory {str(folder)!r} cannot be created: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"output directory {str(folder)!r} cannot be created: no permission to write in {str(parent)!r}"
        )


def output_options(args: argparse.Namespace) -> OutputOptions:
    try:
        return OutputOptions(
            format=args.format,
            quality=args.quality,
            bit_depth=None if args.bit_depth == "auto" else int(args.bit_depth),
            keep_colour=args.keep_colour,
            profile=args.profile,
        )
    except ValueError as error:
        flags = {
            "`format`": "--format",
            "`quality`": "--quality",
            "`bit_depth`": "--bit-depth",
            "`profile`": "--profile",
        }
        message = str(error)
        for name, flag in flags.items():
            message = message.replace(name, flag)
        raise UsageError(message.rstrip(".")) from error


def _check_prompts(args: argparse.Namespace) -> None:
    """The options of prompts and captions, and the models' options that depend on them."""
    if args.prompt is not None and args.caption != "auto":
        raise UsageError(f"--prompt gives a fixed prompt; it conflicts with --caption {args.caption}")
    if args.prompt is not None and args.captioner not in ("auto", "none"):
        raise UsageError("--prompt gives a fixed prompt; it conflicts with --captioner")
    if args.captioner == "none" and (args.captioner_quantization != "auto" or args.preclean):
        raise UsageError("--captioner none writes no captions; drop --captioner-quantization and --preclean")
    if args.compile != "none" and args.offload in ("model", "sequential"):
        raise UsageError(f"--compile keeps the UNet on the device; use --offload text-encoders, not {args.offload}")
    if args.captions_only and (args.captioner == "none" or args.prompt is not None or args.caption != "auto"):
        raise UsageError("--captions-only needs a captioner and --caption auto, without --prompt")
    try:
        check_options(args.offload, args.captioner_quantization, args.preclean, args.fp8, args.low_vram)
    except ValueError as error:
        message = str(error)
        for name, flag in (("`preclean`", "--preclean"), ("`low_vram`", "--low-vram"), ("`fp8`", "--fp8")):
            message = message.replace(name, flag)
        raise UsageError(message) from error


def _check_sampling(args: argparse.Namespace) -> None:
    """The numbers of sampling and tiling: finite and in range."""
    _finite(args.upscale, "--upscale")
    _finite(args.guidance, "--guidance")
    if args.upscale <= 0:
        raise UsageError(f"--upscale must be > 0, got {args.upscale}")
    if args.steps < 1 or args.tile_batch_size < 1:
        raise UsageError("--steps and --tile-batch-size must be at least 1")
    if args.max_pixels < 1:
        raise UsageError(f"--max-pixels must be at least 1, got {args.max_pixels}")


def parse_settings(args: argparse.Namespace) -> RestorationSettings:
    """Checks every option of a parsed restoring command and returns its restoration settings; mistakes raise
    UsageError, named by their flags."""
    _check_prompts(args)
    _check_sampling(args)
    output = output_options(args)
    from .tiling import check_tile_arguments

    try:
        check_tile_arguments(args.tile_size, args.tile_stride)
    except ValueError as error:
        raise UsageError(str(error).replace("`tile_size`", "--tile-size").replace("`tile_stride`", "--tile-stride"))
    _check_output_dir(args.output_dir)
    try:
        check_model_source(args.model)
    except ValueError as error:
        raise UsageError(str(error).replace("`model`", "--model")) from error
    return RestorationSettings.from_arguments(args, output)


def _check_sixteen_bit(paths: list[Path]) -> None:
    missing = [str(path) for path in paths if needs_sixteen_bit_extra(path)]
    if missing:
        raise UsageError(
            f"16-bit colour inputs need imagecodecs and tifffile ({SIXTEEN_BIT_INSTALL}): {_names(missing)}"
        )


def caption_first(
    paths: list[Path],
    settings: RestorationSettings,
    device: torch.device,
    plan: Any,
    summary: Summary,
    prog: str = PROG,
) -> dict:
    """Captions every image that needs a caption and writes its sidecar (the release's format), then frees the
    captioner, so that its memory peak and the restoration's never add up. Images with a sidecar are not captioned
    again. Returns the captions of images whose sidecar could not be written (a read-only folder), which a line on
    stderr, headed ``prog``, reports; a failure goes to ``summary`` and takes the image out of the job."""
    from tqdm.auto import tqdm

    from . import loading
    from .captioning import clean_caption, read_caption, write_caption

    wanted = settings.prompt is None and settings.caption == "auto"
    needing = [path for path in paths if wanted and read_caption(path) is None]
    if not needing or plan.model is None:
        return {}
    captioner = loading.load_planned_captioner(plan, device, loading.resolve_dtype(settings.dtype, device))
    clean = loading.load_preclean(settings.preclean, device) if settings.preclean else None
    kept: dict[Path, str] = {}
    try:
        for path in tqdm(needing, desc="captions", unit="image"):
            try:
                image = read_image(path).to_pil()
                raw = captioner.raw_captions([clean(image) if clean else image], seed=settings.seed)[0]
            except (ValueError, OSError, RuntimeError) as error:
                summary.failed.append((path.name, f"captioning failed: {str(error).splitlines()[0]}"))
                continue
            try:
                write_caption(path, raw)
            except OSError:
                kept[path] = clean_caption(raw)
    finally:
        loading.release(captioner)
    if kept:
        print(
            f"{prog}: {len(kept)} caption sidecar(s) could not be written beside the inputs",
            file=sys.stderr,
        )
    return kept


def prompt_for(path: Path, settings: RestorationSettings, captions: dict) -> str:
    """The prompt of one image, following --prompt / --caption: a fixed prompt, its sidecar, or no prompt."""
    from .captioning import read_caption

    if settings.prompt is not None:
        return settings.prompt
    if settings.caption == "none":
        return ""
    stored = read_caption(path)
    if stored is None and settings.caption == "sidecar":
        raise ValueError(f"no caption sidecar {path.with_suffix('.json').name}")
    return stored if stored is not None else captions.get(path, "")


def side_by_side(lq: PIL.Image.Image, restored: PIL.Image.Image) -> PIL.Image.Image:
    import PIL.Image

    upscaled = lq.convert("RGB").resize(restored.size, PIL.Image.LANCZOS)
    canvas = PIL.Image.new("RGB", (restored.width * 2, restored.height))
    canvas.paste(upscaled, (0, 0))
    canvas.paste(restored, (restored.width, 0))
    return canvas


def restore_one(job: Job, settings: RestorationSettings, pipe: Any, captions: dict, **call_options: Any) -> Any:
    """Restores ``job.source`` as ``settings`` say and writes its result (and comparison); returns the restored
    image (float ``[H, W, 3]`` in [0, 1]). ``call_options`` go to the pipeline call as well."""
    import PIL.Image

    path = job.source
    try:
        image = read_image(path)
    except ValueError as error:
        raise ValueError(f"not a readable image ({error})") from error
    prompt = prompt_for(path, settings, captions)
    # Float output: a 16-bit input keeps its 16 bits.
    arguments = {**settings.call_arguments(prompt), "output_type": "np", **call_options}
    result = pipe(image.pipeline_input(), **arguments).images[0]
    metadata = {"parameters": json.dumps(settings.parameters(path.name, prompt)), "caption": prompt}
    if job.compare:
        restored_8bit = PIL.Image.fromarray((result * 255.0).round().clip(0, 255).astype("uint8"))
        save_result(side_by_side(image.to_pil(), restored_8bit), job.compare, text=metadata)
    save_result(result, job.result, source=image, options=settings.output, text=metadata)
    return result


def load_restoration_pipeline(settings: RestorationSettings, device: torch.device) -> Any:
    """The pipeline as ``settings`` set it up, on ``device``: one call for every engine, so that they never
    differ."""
    from . import loading

    return loading.load_pipeline(
        settings.model,
        device,
        loading.resolve_dtype(settings.dtype, device),
        offload=settings.offload,
        compile=settings.compile,
        fp8=settings.fp8,
        low_vram=settings.low_vram,
        vae_tiling=settings.vae_tiling,
    )


def run(jobs: list[Job], settings: RestorationSettings, pipe: Any, captions: dict, progress: bool = True) -> Summary:
    """Restores every job with :func:`restore_one`; an image that fails is listed in the summary and the run goes
    on."""
    from tqdm.auto import tqdm

    summary = Summary()
    start = time.perf_counter()
    for job in tqdm(jobs, desc="images", unit="image", disable=not progress):
        try:
            restore_one(job, settings, pipe, captions)
        except (ValueError, TypeError, OSError, RuntimeError) as error:
            summary.failed.append(
                (job.source.name, str(error).splitlines()[0] if str(error) else type(error).__name__)
            )
            continue
        summary.done.append(job.source.name)
    summary.seconds = time.perf_counter() - start
    return summary


def _process_share(jobs: list[Job], device: str) -> tuple[list[Job], torch.device | None]:
    """Under ``accelerate launch`` (or torchrun) with several processes, this process's share of the work and its
    device, split by accelerate itself."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return jobs, None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    with state.split_between_processes(jobs) as share:
        return list(share), state.device


def error_line(message: str, prog: str) -> int:
    """Prints a command's one-line error, headed ``prog``; returns the exit status of a usage error."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _captions_only(
    paths: list[Path], settings: RestorationSettings, device: torch.device, plan: Any, prog: str
) -> int:
    from .captioning import read_caption

    captioned_before = [path.name for path in paths if read_caption(path) is not None]
    summary, start = Summary(skipped=captioned_before), time.perf_counter()
    caption_first(paths, settings, device, plan, summary, prog)
    failed = {name for name, _ in summary.failed}
    summary.done = [p.name for p in paths if p.name not in failed and p.name not in captioned_before]
    summary.seconds = time.perf_counter() - start
    print(summary.report())
    return 1 if summary.failed else 0


def _plan(args: argparse.Namespace) -> tuple[RestorationSettings, list[Job], list[Job]]:
    """``(settings, jobs to do, jobs skipped)`` of the local engine; mistakes raise UsageError."""
    settings = parse_settings(args)
    paths = collect_inputs(args.inputs)
    _check_sixteen_bit(paths)
    if args.captions_only:
        return settings, [Job(path, path) for path in paths], []
    from .atomic_files import remove_leftovers

    remove_leftovers(args.output_dir)
    jobs = plan_jobs(paths, args.output_dir, settings.output.suffix, args.compare)
    return settings, *sort_jobs(jobs, args.overwrite)


def restore(args: argparse.Namespace, prog: str = PROG) -> int:
    """The whole command once the arguments are parsed: every check first, then the model, then the images; its
    messages are headed ``prog``."""
    try:
        from . import ray_engine

        ray_engine.check_engine_options(args)
        if args.engine == "ray":
            # Its inputs and outputs may be URIs: it makes these same checks and plans itself, with these functions.
            return ray_engine.restore(args, prog)
        settings, jobs, skipped = _plan(args)
    except UsageError as error:
        return error_line(str(error), prog)
    from . import loading

    share, process_device = _process_share(jobs, settings.device)
    try:
        device = process_device or loading.resolve_device(settings.device)
    except ValueError as error:
        return error_line(str(error).replace("`device`", "--device"), prog)
    plan = loading.plan_captioner(settings.captioner, device, settings.captioner_quantization)
    if args.captions_only and plan.model is None:
        return error_line(f"--captions-only has no captioner: {plan.note}", prog)
    if plan.note:
        print(f"{prog}: {plan.note}", file=sys.stderr)
    if args.captions_only:
        return _captions_only([job.source for job in share], settings, device, plan, prog)
    summary = Summary(skipped=[job.source.name for job in skipped])
    captions = caption_first([job.source for job in share], settings, device, plan, summary, prog)
    failed = {name for name, _ in summary.failed}
    share = [job for job in share if job.source.name not in failed]
    if share:
        try:
            pipe = load_restoration_pipeline(settings, device)
        except (ValueError, OSError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            return error_line(f"could not load the pipeline: {reason}", prog)
        pipe.set_progress_bar_config(leave=False, desc="steps")
        try:
            args.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            reason = error.strerror or error
            return error_line(f"output directory {str(args.output_dir)!r} cannot be created: {reason}", prog)
        worked = run(share, settings, pipe, captions)
        summary.done, summary.failed, summary.seconds = worked.done, summary.failed + worked.failed, worked.seconds
    print(summary.report())
    return 1 if summary.failed else 0


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Runs ``faithdiff-upscale`` with the arguments ``argv`` (default: the command line's), its usage and messages
    headed ``prog``. Returns 0 when every image was restored or skipped, 1 when some failed, 2 on a usage error and
    130 when interrupted."""
    args = build_parser(prog).parse_args(argv)
    try:
        return restore(args, prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished images are kept, rerun to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
