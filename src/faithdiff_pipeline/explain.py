"""``faithdiff-explain``: restore photos and map where the UNet's cross-attention looks at chosen words of their
prompt (DAAM), as heat-map overlays on the restored images and raw 16-bit maps."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cli
from .cli import UsageError
from .restoration_settings import RestorationSettings

if TYPE_CHECKING:
    import numpy as np

    from .attention_maps import AttentionMapRecorder

# torch and diffusers are imported where they are used: `--help` answers at once.
PROG = "faithdiff-explain"
# The recorder's argument names, as this command's flags.
_FLAGS = {
    "`words`": "--words",
    "`layers`": "--layers",
    "`downsampling`": "--downsampling",
    "`steps`": "--record-steps",
}


@dataclass(frozen=True)
class Explained:
    """The files one input gives: its restored image, and per word an overlay and the raw map."""

    source: Path
    restored: Path
    overlays: dict[str, Path]
    maps: dict[str, Path]

    @property
    def targets(self) -> list[Path]:
        return [self.restored, *self.overlays.values(), *self.maps.values()]


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line of ``faithdiff-explain``, named ``prog`` in its usage and messages."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Restore photos with FaithDiff and map, DAAM-style, where the UNet's cross-attention looks at "
        "chosen words of each prompt: per word NAME_WORD.png (a heat-map overlay on the restored image) and "
        "NAME_WORD_map.png (the map, 16-bit greyscale, normalised to [0, 1]), beside the restored NAME.png.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, or glob patterns")
    parser.add_argument(
        "--words",
        required=True,
        help='comma-separated words (or phrases) of the prompt to map, e.g. "beard,cap"; matched whole, in any case',
    )
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("faithdiff-explained"), help="where maps go")
    cli.add_restoration_arguments(parser)
    maps = parser.add_argument_group("attention maps")
    maps.add_argument(
        "--record-steps",
        metavar="STEPS",
        help="denoising steps to record, counted from 0 (of --steps): numbers and ranges such as 0-9,15 "
        "(default: all)",
    )
    maps.add_argument(
        "--layers",
        metavar="PATTERNS",
        help="comma-separated glob patterns of the cross-attention layers to record, by UNet module name, e.g. "
        "'up_blocks.*,mid_block'; a block's name selects all its layers (default: all, as DAAM)",
    )
    maps.add_argument(
        "--downsampling",
        metavar="FACTORS",
        help="record only the layers whose maps are the latent tile downsampled by these factors, e.g. 2,4 (SDXL at "
        "a 1024 px tile: 64x64 and 32x32 maps; default: all)",
    )
    # What faithdiff-upscale's checks and settings read, fixed here: PNG results, no comparison.
    parser.set_defaults(
        captions_only=False,
        format="png",
        quality=95,
        bit_depth="auto",
        keep_colour=False,
        profile="srgb",
        compare=False,
        engine="local",
    )
    return parser


def _items(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise UsageError(f"{flag} takes a comma-separated list without empty entries, got {text!r}")
    return items


def parse_steps(text: str) -> list[int]:
    """Step numbers from ``0-9,15``-style text; mistakes raise UsageError."""
    steps: list[int] = []
    for part in _items(text, "--record-steps"):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and (not last.isdigit() or int(last) < int(first))):
            raise UsageError(
                f"--record-steps takes step numbers and ranges counted from 0, such as 0-9,15; got {text!r}"
            )
        steps.extend(range(int(first), int(last if dash else first) + 1))
    return steps


def _factors(text: str) -> list[int]:
    if not all(item.isdigit() and int(item) > 0 for item in _items(text, "--downsampling")):
        raise UsageError(f"--downsampling takes positive whole numbers such as 2,4; got {text!r}")
    return [int(item) for item in _items(text, "--downsampling")]


def _as_flags(message: str) -> str:
    for name, flag in _FLAGS.items():
        message = message.replace(name, flag)
    return message.rstrip(".")


def make_recorder(args: argparse.Namespace) -> AttentionMapRecorder:
    """The attention-map recorder the options ask for; mistakes raise UsageError."""
    if args.compile != "none":
        raise UsageError("--compile traces the UNet, and the maps are recorded by hooks on its layers; drop --compile")
    if args.caption == "none" and args.prompt is None:
        raise UsageError("--caption none leaves no prompt to find --words in; give --prompt or use captions")
    steps = None if args.record_steps is None else parse_steps(args.record_steps)
    beyond = sorted(step for step in steps or () if step >= args.steps)
    if beyond:
        raise UsageError(f"--record-steps {beyond} are beyond the {args.steps} denoising steps (counted from 0)")
    layers = None if args.layers is None else _items(args.layers, "--layers")
    downsampling = None if args.downsampling is None else _factors(args.downsampling)
    from .attention_maps import AttentionMapRecorder

    try:
        return AttentionMapRecorder(_items(args.words, "--words"), layers, downsampling, steps)
    except (ValueError, TypeError) as error:
        raise UsageError(_as_flags(str(error))) from error


def word_slug(word: str) -> str:
    """A file-name part for ``word``: lower case, runs of anything but letters, digits and ``-`` as one ``_``."""
    return re.sub(r"[^\w-]+", "_", word.casefold()).strip("_") or "word"


def plan_outputs(paths: list[Path], words: Sequence[str], folder: Path) -> list[Explained]:
    """The files of every input; refuses, before any work, files that would share a name or replace an input."""
    out = folder.resolve()
    plans = [
        Explained(
            source=path,
            restored=out / f"{path.stem}.png",
            overlays={word: out / f"{path.stem}_{word_slug(word)}.png" for word in words},
            maps={word: out / f"{path.stem}_{word_slug(word)}_map.png" for word in words},
        )
        for path in paths
    ]
    targets = [target for plan in plans for target in plan.targets]
    clashes = sorted({target.name for target in targets if targets.count(target) > 1})
    if clashes:
        raise UsageError(
            f"outputs would share the names {cli._names(clashes)}; rename the inputs or the words, or split the job"
        )
    replaced = [str(target) for target in targets if target in set(paths)]
    if replaced:
        raise UsageError(f"outputs would replace input files: {cli._names(replaced)}; choose another --output-dir")
    return plans


def write_maps(plan: Explained, restored: np.ndarray, recorder: AttentionMapRecorder) -> None:
    """Writes each word's overlay on ``restored`` and its raw map (16-bit greyscale PNG) of the last recording."""
    import numpy as np
    import PIL.Image

    from .attention_maps import overlay_heat_map
    from .image_io import save_image, save_result

    for word in recorder.words:
        heat = recorder.maps[word][0]
        text = {"word": word, "prompt": recorder.prompts[0]}
        save_result(overlay_heat_map(restored, heat), plan.overlays[word], text=text)
        save_image(PIL.Image.fromarray(np.round(heat * 65535.0).astype(np.uint16)), plan.maps[word])


def explain_all(
    plans: list[Explained],
    settings: RestorationSettings,
    pipe: Any,
    recorder: AttentionMapRecorder,
    captions: dict,
) -> cli.Summary:
    """Restores every planned input with ``recorder`` attached and writes its maps; an image that fails is listed
    in the summary and the run goes on."""
    from tqdm.auto import tqdm

    summary = cli.Summary()
    start = time.perf_counter()
    for plan in tqdm(plans, desc="images", unit="image"):
        try:
            job = cli.Job(plan.source, plan.restored)
            write_maps(plan, cli.restore_one(job, settings, pipe, captions, attention_maps=recorder), recorder)
        except (ValueError, TypeError, OSError, RuntimeError) as error:
            summary.failed.append(
                (plan.source.name, str(error).splitlines()[0] if str(error) else type(error).__name__)
            )
            continue
        summary.done.append(plan.source.name)
    summary.seconds = time.perf_counter() - start
    return summary


def _report(summary: cli.Summary, folder: Path) -> str:
    lines = [f"{len(summary.done)} explained, {len(summary.failed)} failed; maps in {folder}"]
    lines += [f"  failed: {name}: {reason}" for name, reason in summary.failed]
    return "\n".join(lines)


def _with_words_in_prompt(
    plans: list[Explained],
    settings: RestorationSettings,
    captions: dict,
    words: Sequence[str],
    summary: cli.Summary,
) -> list[Explained]:
    """The plans whose prompt holds every word; the others fail here, before the model loads."""
    from .attention_maps import absent_words

    failed, kept = {name for name, _ in summary.failed}, []
    for plan in plans:
        if plan.source.name in failed:
            continue
        try:
            prompt = cli.prompt_for(plan.source, settings, captions)
        except ValueError as error:
            summary.failed.append((plan.source.name, str(error)))
            continue
        missing = absent_words(prompt, words)
        if missing:
            reason = f"The word {missing[0]!r} is not in the prompt {prompt!r}; map words of the prompt."
            summary.failed.append((plan.source.name, reason))
        else:
            kept.append(plan)
    return kept


def explain(args: argparse.Namespace, prog: str = PROG) -> int:
    """The whole command once the arguments are parsed: every check first, then the model, then the images; its
    messages are headed ``prog``."""
    try:
        settings = cli.parse_settings(args)
        recorder = make_recorder(args)
        paths = cli.collect_inputs(args.inputs)
        cli._check_sixteen_bit(paths)
        plans = plan_outputs(paths, recorder.words, args.output_dir)
    except UsageError as error:
        return cli.error_line(str(error), prog)
    from . import loading
    from .atomic_files import remove_leftovers

    try:
        device = loading.resolve_device(settings.device)
    except ValueError as error:
        return cli.error_line(str(error).replace("`device`", "--device"), prog)
    plan = loading.plan_captioner(settings.captioner, device, settings.captioner_quantization)
    if plan.note:
        print(f"{prog}: {plan.note}", file=sys.stderr)
    summary = cli.Summary()
    captions = cli.caption_first(paths, settings, device, plan, summary, prog)
    plans = _with_words_in_prompt(plans, settings, captions, recorder.words, summary)
    if not plans:
        print(_report(summary, args.output_dir))
        return 1
    try:
        pipe = cli.load_restoration_pipeline(settings, device)
    except (ValueError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return cli.error_line(f"could not load the pipeline: {reason}", prog)
    try:
        recorder.select_layers(pipe.unet)
    except ValueError as error:
        return cli.error_line(_as_flags(str(error)), prog)
    pipe.set_progress_bar_config(leave=False, desc="steps")
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or error
        return cli.error_line(f"output directory {str(args.output_dir)!r} cannot be created: {reason}", prog)
    remove_leftovers(args.output_dir)
    worked = explain_all(plans, settings, pipe, recorder, captions)
    summary.done, summary.failed = worked.done, summary.failed + worked.failed
    print(_report(summary, args.output_dir))
    return 1 if summary.failed else 0


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Runs ``faithdiff-explain`` with the arguments ``argv`` (default: the command line's), its usage and messages
    headed ``prog``. Returns 0 when every image was explained, 1 when some failed, 2 on a usage error and 130 when
    interrupted."""
    args = build_parser(prog).parse_args(argv)
    try:
        return explain(args, prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the maps of finished images are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
