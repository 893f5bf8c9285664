"""``faithdiff-explain``: restore photos and map where the UNet's cross-attention looks at chosen words of their
prompt (DAAM), as heat-map overlays on the restored images and raw 16-bit maps."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .application.options import OPTIONS, as_flags
from .application.planning import Job
from .application.settings import PROVENANCE_OPTIONS, RestorationSettings
from .command_line import RESTORATION_OPTIONS, add_options, error_line, note_printer, values_of

if TYPE_CHECKING:
    import numpy as np

    from .attention_maps import AttentionMapRecorder
    from .image_io import ImageFile

# torch and diffusers are imported where they are used: `--help` answers at once.
PROG = "faithdiff-explain"


class UsageError(ValueError):
    """A mistake in this command's own options (the attention maps'), already worded with their flags."""


@dataclass(frozen=True)
class AttentionMapFiles:
    """The outputs of ``faithdiff-explain`` per input: the restored ``NAME.png``, and per word an overlay
    ``NAME_WORD.png`` and the raw map ``NAME_WORD_map.png`` (16-bit greyscale), all of them ours."""

    recorder: AttentionMapRecorder

    def names(self, stem: str) -> list[str]:
        slugs = [word_slug(word) for word in self.recorder.words]
        return [f"{stem}.png", *(f"{stem}_{slug}{end}" for slug in slugs for end in (".png", "_map.png"))]

    def check(self, job: Job, prompt: str) -> None:
        """A word missing from the prompt fails the image before the model loads."""
        from .attention_maps import absent_words

        missing = absent_words(prompt, self.recorder.words)
        if missing:
            raise ValueError(f"The word {missing[0]!r} is not in the prompt {prompt!r}; map words of the prompt.")

    def attach(self, pipe: Any) -> dict[str, Any]:
        self.recorder.select_layers(pipe.unet)
        return {"attention_maps": self.recorder}

    def write(self, job: Job, photo: ImageFile, restorations: list[np.ndarray], prompt: str,
              settings: RestorationSettings) -> None:
        """Writes each word's overlay on the restored image and its raw map of the last recording, then the restored
        image (last: its presence with the maps' marks the image as done)."""
        restored = restorations[0]
        import numpy as np
        import PIL.Image

        from .application.restoring import result_metadata
        from .attention_maps import overlay_heat_map
        from .image_io import save_image, save_result

        for index, word in enumerate(self.recorder.words):
            heat = self.recorder.maps[word][0]
            text = {"word": word, "prompt": self.recorder.prompts[0]}
            save_result(overlay_heat_map(restored, heat), job.outputs[1 + 2 * index], text=text)
            raw = PIL.Image.fromarray(np.round(heat * 65535.0).astype(np.uint16))
            save_image(raw, job.outputs[2 + 2 * index], text=text)
        metadata = result_metadata(settings, job.name, prompt)
        save_result(restored, job.result, source=photo, options=settings.output, text=metadata,
                    signing=settings.signing)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line of ``faithdiff-explain``, named ``prog`` in its usage and messages."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Restore photos with FaithDiff and map, DAAM-style, where the UNet's cross-attention looks at "
        "chosen words of each prompt: per word NAME_WORD.png (a heat-map overlay on the restored image) and "
        "NAME_WORD_map.png (the map, 16-bit greyscale, normalised to [0, 1]), beside the restored NAME.png.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, or glob patterns")
    parser.add_argument("--words", required=True, help=OPTIONS["words"].help)
    parser.add_argument("-o", "--output-dir", default="faithdiff-explained", help="where maps go")
    add_options(parser, RESTORATION_OPTIONS)
    add_options(parser, ["overwrite", *PROVENANCE_OPTIONS])
    add_options(parser.add_argument_group("attention maps"), ["record_steps", "layers", "downsampling"])
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
        raise UsageError(as_flags(str(error))) from error


def word_slug(word: str) -> str:
    """A file-name part for ``word``: lower case, runs of anything but letters, digits and ``-`` as one ``_``."""
    return re.sub(r"[^\w-]+", "_", word.casefold()).strip("_") or "word"


def explain(args: argparse.Namespace, prog: str = PROG) -> int:
    """The whole command once the arguments are parsed: every check first, then the model, then the images; its
    messages are headed ``prog``."""
    from .application import JobFailed
    from .application.local_engine import plan_local_job, run_local_job

    try:
        settings = RestorationSettings.from_options(**values_of(args, [*RESTORATION_OPTIONS, *PROVENANCE_OPTIONS]))
        recorder = make_recorder(args)
        job = plan_local_job(args.inputs, args.output_dir, settings, AttentionMapFiles(recorder), args.overwrite)
        summary = run_local_job(job, note_printer(prog))
    except (ValueError, TypeError, JobFailed) as error:
        return error_line(error, prog)
    lines = [f"{len(summary.done)} explained, {len(summary.skipped)} skipped (already explained), "
             f"{len(summary.failed)} failed; maps in {args.output_dir}"]
    print("\n".join(lines + [f"  failed: {name}: {reason}" for name, reason in summary.failed]))
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
