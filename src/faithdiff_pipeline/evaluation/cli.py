"""``faithdiff-eval``: restore an evaluation set with several methods, score them and write the paper-style reports."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import PIL.Image

from .. import loading
from .. import release_settings as release
from ..atomic_files import write_text_atomic
from ..command_line import parser_error_line
from ..image_io import read_image, save_result
from .datasets import (
    MANIFEST_NAME,
    ImagePair,
    PairedSet,
    make_synthetic_set,
    pair_folders,
    read_tensor,
)
from .methods import (
    CAPTION_SOURCES,
    SETTINGS_NAME,
    ComputedMethod,
    EvaluationMethod,
    LanczosMethod,
    MethodContext,
    SamplingSettings,
    parse_method,
    read_results_settings,
)
from .metric_specs import EVAL_EXTRA, METRICS, OCR_METRICS, MetricUnavailableError
from .ocr_backends import OCR_BACKENDS, OcrUnavailableError
from .report import crop_grid, crop_tiles, markdown_table, plot_metrics, write_csv

if TYPE_CHECKING:
    import torch

    from .metrics import ScoreFn
    from .ocr import OcrEvaluation
    from .ocr_backends import OcrBackend

PROG = "faithdiff-eval"
OCR_READINGS_NAME = "ocr.jsonl"
# The reports written in --out, beside results/.
REPORT_NAMES = ("metrics.csv", "table.md", "metrics.png", "crops.png", OCR_READINGS_NAME)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command-line interface (see ``docs/evaluation.md``), named ``prog`` in its usage and messages."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Restore an evaluation set with FaithDiff and other methods, and compare them with IQA metrics.",
    )
    data = parser.add_argument_group("evaluation set (either --hq and --lq, or --make-set)")
    data.add_argument("--hq", metavar="DIR", help="folder of high-quality (ground-truth) images")
    data.add_argument("--lq", metavar="DIR", help="folder of low-quality inputs, paired with --hq by file name")
    data.add_argument("--make-set", metavar="HQ_DIR", help="build a synthetic set from the HQ images of this folder")
    data.add_argument("--preset", help="degradation preset for --make-set (e.g. dasr-level2)")
    data.add_argument("--seed", type=int, default=0, help="seed of the synthetic set (default: 0)")
    data.add_argument("--set-dir", metavar="OUT", help="folder the synthetic set is written to")
    data.add_argument(
        "--ocr-truth",
        metavar="PATH",
        help="ground-truth text: a JSON file {NAME: text} or a folder of ICDAR-style gt_NAME.txt word boxes; for "
        "--ocr (default: the text a --make-set set carries), and carried into a set built by --make-set",
    )

    run = parser.add_argument_group("methods, metrics and outputs")
    run.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="lanczos, faithdiff=PIPELINE_DIR_OR_HUB_ID, or NAME=RESULT_DIR for results of another method "
        "(paired by file name); repeat for several (default: lanczos)",
    )
    run.add_argument(
        "--metrics", help=f"comma-separated, among {', '.join(METRICS)} (default: all that are installed)"
    )
    run.add_argument("--out", metavar="DIR", help="folder for results and reports")
    run.add_argument("--overwrite", action="store_true", help="recompute existing results (and rebuild --set-dir)")
    run.add_argument("--grid-images", type=int, default=4, help="images shown in the crop grid (default: 4)")
    run.add_argument("--crop-size", type=int, default=128, help="side of the grid's crops in HQ pixels (default: 128)")

    ocr = parser.add_argument_group("OCR evaluation (see docs/evaluation.md)")
    ocr.add_argument(
        "--ocr",
        metavar="BACKEND",
        help=f"also read each result's text and score it against --ocr-truth: {' or '.join(OCR_BACKENDS)}",
    )
    ocr.add_argument("--ocr-lang", metavar="CODES", help="tesseract's language codes, e.g. eng+deu (default: eng)")
    ocr.add_argument(
        "--ocr-case-sensitive", action="store_true", help="compare texts with their case (default: case folded)"
    )

    sampling = parser.add_argument_group("FaithDiff sampling (for --method faithdiff=...)")
    sampling.add_argument(
        "--steps",
        type=int,
        default=release.NUM_INFERENCE_STEPS,
        help=f"denoising steps (default: {release.NUM_INFERENCE_STEPS}, the release's)",
    )
    sampling.add_argument("--upscale", type=float, help="upscale factor (default: the set's scale)")
    sampling.add_argument("--sample-seed", type=int, default=0, help="seed of each image's sampling (default: 0)")
    sampling.add_argument("--prompt", default="", help="one prompt for every image (default: none)")
    sampling.add_argument(
        "--captions",
        choices=CAPTION_SOURCES,
        default="fixed",
        help="fixed: --prompt for every image; sidecar: each LQ image's caption sidecar (NAME.json beside it, "
        "the release's format, e.g. LLaVA captions written by faithdiff-upscale --captions-only)",
    )
    sampling.add_argument(
        "--tile-size",
        type=int,
        default=release.TILE_SIZE,
        help=f"latent tile size in pixels (default: {release.TILE_SIZE}, the release's)",
    )
    sampling.add_argument(
        "--device",
        default="auto",
        help="auto (default: cuda, else mps, else cpu, as faithdiff-upscale), cpu, cuda, cuda:1, mps; also used by "
        "pyiqa",
    )
    sampling.add_argument(
        "--dtype",
        choices=["auto", *loading.DTYPE_NAMES],
        default="auto",
        help="auto (default): float16 on a GPU, float32 on the CPU",
    )
    sampling.add_argument(
        "--variant",
        help="weights variant to load, e.g. fp16 (default: the fp16 files for float16 and bfloat16 where the "
        "pipeline folder has them, as faithdiff-upscale loads)",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Runs ``faithdiff-eval`` with the arguments ``argv`` (default: the command line's), its usage and messages
    headed ``prog``. Returns 0 on success, 1 when some images failed, 2 on a usage error (one line, before any
    model loads)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        # Checked first: a mistake in the settings, or a missing OCR engine, must not wait until a set is built.
        settings = _run_settings(args)
        ocr_backend = _ocr_backend(args, settings.device)
        if args.out is not None:
            _check_out(Path(args.out), _input_folders(args), settings.methods)
        dataset, caption = _load_set(args)
        if args.out is None:
            if args.make_set:
                print(f"Wrote {len(dataset.pairs)} pairs (scale {dataset.scale}) to {args.set_dir}")
                return 0
            raise ValueError("`out` is required to evaluate methods: the folder for results and reports.")
        run = _prepare_run(args, settings, dataset, ocr_backend)
        _load_methods(run)
        if run.ocr is not None:
            run.ocr.backend.load(words=run.ocr.truth.kind == "words")
    except (ValueError, OSError, MetricUnavailableError, OcrUnavailableError) as error:
        return parser_error_line(error, prog, parser)
    failures = _restore_all(run)
    rows = _score_all(run, failures)
    _write_reports(run, rows, caption)
    if failures:
        print(f"{prog}: {len(failures)} image(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


@dataclass(frozen=True)
class RunSettings:
    """The settings of an evaluation that do not depend on the set, each checked once, as it is parsed."""

    methods: list[EvaluationMethod]
    metric_names: list[str]
    sampling: SamplingSettings
    device: torch.device
    dtype: torch.dtype
    grid_images: int
    crop_size: int


def _run_settings(args: argparse.Namespace) -> RunSettings:
    from .metrics import default_metric_names, parse_metric_names

    methods = [parse_method(text) for text in args.method] or [LanczosMethod()]
    duplicates = sorted({m.name for m in methods if [n.name for n in methods].count(m.name) > 1})
    if duplicates:
        raise ValueError(f"`--method` names {', '.join(duplicates)} more than once; give each method its own name.")
    for name in ("grid_images", "crop_size"):
        value = getattr(args, name)
        if value < (0 if name == "grid_images" else 1):
            raise ValueError(f"`{name}` must be a positive integer, got {value}.")
    sampling = SamplingSettings(
        steps=args.steps,
        upscale=args.upscale,
        sample_seed=args.sample_seed,
        prompt=args.prompt,
        captions=args.captions,
        tile_size=args.tile_size,
        variant=args.variant,
    )
    device, dtype = device_and_dtype(args.device, args.dtype)
    if args.metrics:
        metric_names = parse_metric_names(args.metrics)
    elif args.out is None:
        metric_names = []  # a set is built, nothing is scored
    else:
        metric_names, note = default_metric_names()
        if note:
            print(note, file=sys.stderr)
    return RunSettings(methods, metric_names, sampling, device, dtype, args.grid_images, args.crop_size)


def _load_set(args: argparse.Namespace) -> tuple[PairedSet, str]:
    if args.make_set:
        if args.hq or args.lq:
            raise ValueError(
                "`--make-set` builds its own HQ/LQ pairs; pass either --make-set or --hq and --lq, not both."
            )
        if not args.preset or not args.set_dir:
            raise ValueError(f"`--make-set {args.make_set}` needs --preset NAME and --set-dir OUT.")
        if args.ocr_truth:
            from .text_sets import make_text_set

            dataset = make_text_set(
                args.make_set, args.set_dir, args.preset, args.ocr_truth, args.seed, overwrite=args.overwrite
            )
        else:
            dataset = make_synthetic_set(args.make_set, args.set_dir, args.preset, args.seed, overwrite=args.overwrite)
    elif not args.hq or not args.lq:
        raise ValueError(
            "an evaluation set is needed: pass --hq DIR and --lq DIR, or --make-set HQ_DIR --preset NAME --set-dir OUT."
        )
    else:
        dataset = pair_folders(args.hq, args.lq)
    return dataset, _describe_set(dataset)


def _describe_set(dataset: PairedSet) -> str:
    """The set's name for the table caption: its folder, with the preset and seed of a synthetic set."""
    folder = dataset.hq_dir.resolve()
    manifest = folder.parent / MANIFEST_NAME
    if folder.name != "hq" or not manifest.is_file():
        return folder.name
    try:
        made = json.loads(manifest.read_text(encoding="utf-8"))
        return f"{folder.parent.name} (preset {made['preset']}, seed {made['seed']})"
    except (ValueError, KeyError):
        return folder.parent.name


@dataclass
class Run:
    """Everything one evaluation needs, checked before any image is processed."""

    context: MethodContext
    settings: RunSettings
    scorers: dict[str, ScoreFn] = field(default_factory=dict)
    ocr: OcrEvaluation | None = None
    # What OCR read, one record per scored (method, image).
    readings: list[dict] = field(default_factory=list)

    @property
    def dataset(self) -> PairedSet:
        return self.context.dataset

    @property
    def out(self) -> Path:
        return self.context.out

    @property
    def methods(self) -> list[EvaluationMethod]:
        return self.settings.methods

    @property
    def metric_names(self) -> list[str]:
        return self.settings.metric_names


def _prepare_run(
    args: argparse.Namespace, settings: RunSettings, dataset: PairedSet, ocr_backend: OcrBackend | None = None
) -> Run:
    from .metrics import load_metric

    out = Path(args.out)
    context = MethodContext(dataset, out, settings.device, settings.dtype, settings.sampling, args.overwrite)
    run = Run(context, settings)
    for method in settings.methods:
        method.prepare(context)
    if ocr_backend is not None:
        run.ocr = _prepare_ocr(args, dataset, ocr_backend)
    run.scorers = {name: load_metric(name, settings.device) for name in settings.metric_names}
    return run


def _input_folders(args: argparse.Namespace) -> list[tuple[Path, str]]:
    """The folders whose images a run reads, with their role."""
    if args.make_set:
        named = [(args.make_set, "the folder of `make_set`")]
        if args.set_dir:
            set_dir = Path(args.set_dir)
            named += [(set_dir / "hq", "the set's HQ folder"), (set_dir / "lq", "the set's LQ folder")]
    else:
        named = [(args.hq, "the HQ folder"), (args.lq, "the LQ folder")]
    return [(Path(folder), role) for folder, role in named if folder]


def _check_out(out: Path, inputs: Sequence[tuple[Path, str]], methods: Sequence[EvaluationMethod]) -> None:
    """Refuses, before any work, an ``--out`` that is a file, that is an input folder (its reports, metrics.png and
    crops.png, would be taken for images of the set by the next run; a subfolder is fine, since only the files
    directly in a folder are read), that holds reports that we did not write (an ``--out`` of ours holds our
    metrics.csv or results folders), or whose results folder of a method is not ours (holds no settings.json)."""
    from ..application.planning import check_output_dir

    check_output_dir(str(out), "out")
    for folder, role in inputs:
        if out.resolve() == folder.resolve():
            raise ValueError(
                f"`out` {str(out)!r} is {role}; its reports would be taken for images of the set; choose another "
                "folder (a subfolder is fine)."
            )
    for method in methods:
        if isinstance(method, ComputedMethod):
            read_results_settings(out / "results" / method.name)
    present = [name for name in REPORT_NAMES if (out / name).exists()]
    if present and not _is_ours(out):
        raise ValueError(
            f"`out` {str(out)!r} holds {', '.join(present)}, which faithdiff-eval did not write; move them or choose "
            "another `out` (files we did not make are never replaced, `overwrite` or not)."
        )


def _is_ours(out: Path) -> bool:
    """Whether ``out`` holds reports of an earlier run: our metrics.csv, or results folders of ours."""
    try:
        with (out / "metrics.csv").open(encoding="utf-8") as stream:
            if stream.readline().startswith("method,image"):
                return True
    except (OSError, UnicodeDecodeError):
        pass
    results = out / "results"
    if not results.is_dir():
        return False
    for folder in results.iterdir():
        try:
            if folder.is_dir() and read_results_settings(folder) is not None:
                return True
        except ValueError:
            continue
    return False


def _ocr_backend(args: argparse.Namespace, device: torch.device) -> OcrBackend | None:
    """The engine of ``--ocr``, checked to be installed but not loaded, or ``None`` without ``--ocr`` (whose other
    options are then refused)."""
    from .ocr_backends import create_backend

    if args.ocr is None:
        for option, given in (("--ocr-lang", args.ocr_lang), ("--ocr-case-sensitive", args.ocr_case_sensitive)):
            if given:
                raise ValueError(f"`{option}` sets how --ocr reads; pass --ocr BACKEND ({' or '.join(OCR_BACKENDS)}).")
        if args.ocr_truth and not args.make_set:
            raise ValueError(
                "`--ocr-truth` is the ground truth of --ocr BACKEND or of a set built by --make-set; pass one of them."
            )
        return None
    return create_backend(args.ocr, str(device), args.ocr_lang)


def _prepare_ocr(args: argparse.Namespace, dataset: PairedSet, backend: OcrBackend) -> OcrEvaluation:
    """The OCR part of the run: ``backend`` and the set's ground truth, checked against the set."""
    from .ocr import OcrEvaluation
    from .ocr_truth import read_text_truth, set_truth_path
    from .text_metrics import TextNormalization

    # A set built here carries its ground truth in its own pixels; the source's would not fit its crops.
    path = set_truth_path(dataset.hq_dir) if args.make_set or not args.ocr_truth else Path(args.ocr_truth)
    if path is None:
        raise ValueError(
            f"`--ocr {args.ocr}` needs ground-truth text: --ocr-truth FILE.json or a folder of gt_NAME.txt word "
            "boxes (a set built by --make-set ... --ocr-truth carries its own)."
        )
    truth = read_text_truth(path)
    truth.check_covers(pair.name for pair in dataset.pairs)
    return OcrEvaluation(backend, truth, TextNormalization(case_sensitive=args.ocr_case_sensitive))


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of a run, chosen by :mod:`faithdiff_pipeline.loading` as faithdiff-upscale and the web
    demo choose them: ``"auto"`` (or ``None``) falls back from CUDA to MPS to the CPU, and to float16 on a GPU,
    float32 on the CPU."""
    resolved = loading.resolve_device(device)
    return resolved, loading.resolve_dtype(dtype, resolved)


def _load_methods(run: Run) -> None:
    """Loads what the computed methods with images left to restore need (their pipelines), before any work starts so
    that a wrong path fails at once."""
    for method in run.methods:
        if method.todo(run.context):
            method.load(run.context)


def _restore_all(run: Run) -> list[str]:
    """Restores and saves every missing result; returns ``method/image`` for each failure (reported as it happens)."""
    from tqdm.auto import tqdm

    failures = []
    for method in run.methods:
        todo = method.todo(run.context)
        if not todo:
            continue
        folder = method.folder(run.context)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / SETTINGS_NAME, json.dumps(method.settings, indent=2) + "\n")
        for pair in tqdm(todo, desc=f"restoring with {method.name}", unit="image"):
            try:
                # 8-bit sRGB RGB PNG (no source metadata), atomically: what the metrics read back, and never a
                # truncated file that a resumed run would take for a result.
                save_result(method.restore(pair), method.results[pair.name])
            except Exception as error:  # noqa: BLE001 - one bad image must not stop a long run: reported, counted
                failures.append(f"{method.name}/{pair.name}")
                message = f"{PROG}: {method.name}/{pair.name}: restoring failed: {_reason(error)}"
                tqdm.write(message, file=sys.stderr)
    return failures


def _score_all(run: Run, failures: list[str]) -> list[dict]:
    """Scores every available result; a result that cannot be read or scored is reported and added to ``failures``."""
    from tqdm.auto import tqdm

    rows = []
    for pair in tqdm(run.dataset.pairs, desc="scoring", unit="image"):
        for method in run.methods:
            key = f"{method.name}/{pair.name}"
            if key in failures:
                continue
            try:
                rows.append(_score(run, method, pair))
            except Exception as error:  # noqa: BLE001 - as above: counted, reported, and the run goes on
                failures.append(key)
                tqdm.write(f"{PROG}: {key}: scoring failed: {_reason(error)}", file=sys.stderr)
    order = {method.name: i for i, method in enumerate(run.methods)}
    return sorted(rows, key=lambda row: (order[row["method"]], row["image"]))


def _reason(error: BaseException) -> str:
    """An error in one line: its type and the first line of its message."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _score(run: Run, method: EvaluationMethod, pair: ImagePair) -> dict:
    from .metrics import score_result

    hq = read_tensor(pair.hq)
    restored = read_tensor(method.results[pair.name])
    if restored.shape != hq.shape:
        raise ValueError(
            f"result {str(method.results[pair.name])!r} is {restored.shape[-1]}x{restored.shape[-2]}; "
            f"expected the HQ size {hq.shape[-1]}x{hq.shape[-2]}."
        )
    row: dict[str, Any] = {"method": method.name, "image": pair.name}
    row.update(score_result(run.scorers, restored, hq, read_tensor(pair.lq)))
    if run.ocr is not None:
        row.update(_score_ocr(run.ocr, method.results[pair.name], pair, run.readings, method.name))
    return row


def _score_ocr(ocr: OcrEvaluation, result: Path, pair: ImagePair, readings: list[dict], method: str) -> dict:
    """The OCR scores of one result; what was read is added to ``readings``."""
    from .ocr import score_text

    scores, reading = score_text(
        read_image(result).to_pil(), ocr.truth.images[pair.name], pair.hq_size, ocr.backend, ocr.normalization
    )
    readings.append(
        {"method": method, "image": pair.name, "references": reading.references, "predictions": reading.predictions}
    )
    return scores


def _write_reports(run: Run, rows: list[dict], caption: str) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    names = run.metric_names + (list(OCR_METRICS) if run.ocr is not None else [])
    write_csv(rows, names, run.out / "metrics.csv")
    count = len(run.dataset.pairs)
    caption = f"Means over {count} images of {caption}, scale x{run.dataset.scale}."
    if run.ocr is not None:
        caption += f" {run.ocr.describe()}."
        _write_readings(run, rows)
    table = markdown_table(rows, names, caption)
    write_text_atomic(run.out / "table.md", table)
    print(table)
    if rows:
        try:
            plot_metrics(rows, names, run.out / "metrics.png")
        except ImportError:
            print(f"note: metrics.png skipped: matplotlib is not installed ({EVAL_EXTRA}).", file=sys.stderr)
    _write_grid(run)


def _write_readings(run: Run, rows: list[dict]) -> None:
    """``ocr.jsonl``: for each scored (method, image), in the order of the CSV, the reference and read texts."""
    by_key = {(reading["method"], reading["image"]): reading for reading in run.readings}
    lines = [json.dumps(by_key[row["method"], row["image"]], ensure_ascii=False) + "\n" for row in rows]
    write_text_atomic(run.out / OCR_READINGS_NAME, "".join(lines))


def _write_grid(run: Run) -> None:
    pairs = run.dataset.pairs[: run.settings.grid_images]
    grid_rows = []
    for pair in pairs:
        hq = _open_if_present(pair.hq)
        if hq is None:
            continue
        results = [_open_if_present(method.results[pair.name]) for method in run.methods]
        tiles = crop_tiles(hq, _open_if_present(pair.lq), results, run.dataset.scale, run.settings.crop_size)
        grid_rows.append((pair.name, tiles))
    if not grid_rows:
        return
    labels = ["LQ (nearest)", *(method.name for method in run.methods), "HQ"]
    crop_grid(grid_rows, labels, run.out / "crops.png")


def _open_if_present(path: Path) -> PIL.Image.Image | None:
    """The image at ``path`` as 8-bit RGB (upright, in sRGB), or ``None`` when it is missing or unreadable."""
    try:
        return read_image(path).to_pil()
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
