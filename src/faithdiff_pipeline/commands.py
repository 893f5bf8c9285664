"""``faithdiff``: every command of the package as a subcommand, e.g. ``faithdiff upscale photo.jpg``.

Each subcommand is the ``faithdiff-NAME`` script of the same name (``faithdiff upscale`` is ``faithdiff-upscale``),
run with ``prog="faithdiff NAME"`` so that its usage and messages carry the name it was called by. Only the chosen
command's module is imported, and none of them imports an ML framework before it has parsed its arguments, so that
``faithdiff --help`` and every ``--help`` under it answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

PROG = "faithdiff"
_HELP_FLAGS = ("-h", "--help")


@dataclass(frozen=True)
class Command:
    """One subcommand.

    Attributes:
        module: The module whose ``main(argv, prog)`` runs the command.
        summary: One line on what it does, for ``faithdiff --help``.
    """

    module: str
    summary: str


# In the order a project meets them: convert the release, restore, look inside, evaluate, then train.
COMMANDS = {
    "convert": Command("faithdiff_pipeline.conversion", "convert the official release to a pipeline folder"),
    "upscale": Command("faithdiff_pipeline.cli", "restore and upscale photos, resumably"),
    "explain": Command("faithdiff_pipeline.explain", "map where the UNet looks at words of the prompt"),
    "eval": Command("faithdiff_pipeline.evaluation.cli", "restore an evaluation set and score the methods"),
    "prepare-data": Command("faithdiff_pipeline.training.prepare", "make a training set: HQ/LQ crops and captions"),
    "train": Command("faithdiff_pipeline.training.train", "train the alignment module, UNet and LQ encoder"),
}


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line of ``faithdiff`` as ``--help`` shows it, named ``prog``: the subcommands, each with its
    summary. It parses only the subcommand's name; what follows is the subcommand's own."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="FaithDiff image restoration with SDXL: every command of the package.",
        epilog=f"Each command's own options: {prog} COMMAND --help. The faithdiff-COMMAND scripts "
        "(faithdiff-upscale, ...) are the same commands.",
    )
    subcommands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for name, command in COMMANDS.items():
        subcommands.add_parser(name, help=command.summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Runs ``faithdiff COMMAND ARGS...`` with the arguments ``argv`` (default: the command line's): the command's
    ``main`` with ``ARGS``, its usage and messages headed ``"<prog> COMMAND"``. Returns the command's exit status, or
    2 with one line on stderr when no known command is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _HELP_FLAGS:
        build_parser(prog).parse_args(argv[:1])  # prints the help and exits
    name = argv[0] if argv else None
    if name not in COMMANDS:
        problem = "a command is needed" if name is None else f"{name!r} is not a command"
        choices = ", ".join(COMMANDS)
        print(f"{prog}: error: {problem}; choose from {choices} (see {prog} --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name].module)
    return module.main(argv[1:], prog=f"{prog} {name}")


if __name__ == "__main__":
    sys.exit(main())
