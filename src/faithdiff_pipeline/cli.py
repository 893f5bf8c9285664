"""``faithdiff-upscale``: restore files, folders or globs of photos, resumably, on one device or several, or on Ray.

The command parses its arguments and hands them to the application layer (:mod:`faithdiff_pipeline.application`),
whose mistakes it shows with the flags, in one line, exit status 2, before any model loads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .application.options import OPTIONS, RAY_OPTIONS
from .application.settings import OUTPUT_OPTIONS, RestorationSettings
from .command_line import RESTORATION_OPTIONS, add_options, error_line, note_printer, values_of

# torch and diffusers are imported where they are used: `--help` and every usage error answer at once.
PROG = "faithdiff-upscale"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line of ``faithdiff-upscale``, named ``prog`` in its usage and messages."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Restore and upscale photos with FaithDiff. Finished images are skipped on a rerun; inputs and "
        "files we did not make are never overwritten.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, or glob patterns")
    parser.add_argument("-o", "--output-dir", default=OPTIONS["output_dir"].default, help=OPTIONS["output_dir"].help)
    add_options(parser, RESTORATION_OPTIONS)
    add_options(parser, ["captions_only"])
    add_options(parser.add_argument_group("result files"), [*OUTPUT_OPTIONS, "compare", "overwrite"])
    add_options(
        parser.add_argument_group("fidelity (docs/fidelity.md)"),
        ["fidelity", "fidelity_threshold", "fail_below_threshold", "seeds"],
    )
    add_options(parser.add_argument_group("engine"), ["engine", *RAY_OPTIONS])
    return parser


def restore(args: argparse.Namespace, prog: str = PROG) -> int:
    """The whole command once the arguments are parsed: every check first, then the models, then the images; its
    messages are headed ``prog``."""
    from .application import JobFailed, ResultFiles, check_engine_options, check_fidelity_options
    from .application.local_engine import plan_local_job, run_local_job, write_captions

    notify = note_printer(prog)
    try:
        settings = RestorationSettings.from_options(
            **values_of(args, [*RESTORATION_OPTIONS, *OUTPUT_OPTIONS, "fidelity", "seeds"])
        )
        check_engine_options(args.engine, [name for name in RAY_OPTIONS if getattr(args, name) is not None])
        check_fidelity_options(settings, args.fidelity_threshold, args.fail_below_threshold)
        outputs = ResultFiles(settings.output.suffix, args.compare, settings.fidelity, settings.seeds > 1)
        if args.captions_only:
            if args.engine == "ray":
                raise ValueError("`captions_only` runs on the local engine; drop `engine` ray.")
            summary = write_captions(args.inputs, settings, notify)
        elif args.engine == "ray":
            from .application.ray_engine import run_ray_job

            ray_options = values_of(args, RAY_OPTIONS)
            summary = run_ray_job(
                args.inputs, args.output_dir, settings, outputs, overwrite=args.overwrite, notify=notify, **ray_options
            )
        else:
            job = plan_local_job(args.inputs, args.output_dir, settings, outputs, args.overwrite)
            summary = run_local_job(job, notify)
    except (ValueError, TypeError, JobFailed) as error:
        return error_line(error, prog)
    print(summary.report())
    below = [] if args.fidelity_threshold is None else summary.below(args.fidelity_threshold)
    if below:
        print(f"  below the fidelity threshold of {args.fidelity_threshold:g} dB LR-PSNR: {', '.join(below)}")
    if summary.failed:
        return 1
    return 3 if below and args.fail_below_threshold else 0


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Runs ``faithdiff-upscale`` with the arguments ``argv`` (default: the command line's), its usage and messages
    headed ``prog``. Returns 0 when every image was restored or skipped, 1 when some failed, 2 on a usage error or a
    job that could not start, 3 with ``--fail-below-threshold`` when a result is below ``--fidelity-threshold``, and
    130 when interrupted."""
    args = build_parser(prog).parse_args(argv)
    try:
        return restore(args, prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished images are kept, rerun to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
