"""What the commands that restore share on the command line: their parser built from the option table, and the
application layer's errors shown with the flags, one line each."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any

from .application.options import OPTIONS, as_flags

# The options of every command that restores, in --help's order: the model, sampling, tiles, captions, device and
# precision.
RESTORATION_OPTIONS = (
    "model", "upscale", "steps", "guidance", "seed", "start_point", "tile_size", "tile_stride", "tile_batch_size",
    "color_fix", "max_pixels", "caption", "prompt", "negative_prompt", "captioner", "captioner_quantization",
    "preclean", "device", "dtype", "offload", "compile", "fp8", "low_vram", "vae_tiling",
)


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, names: Sequence[str]) -> None:
    """Adds the named options of the table to ``parser``, each with its flag, default, choices and help."""
    for name in names:
        option = OPTIONS[name]
        if option.kind is bool:
            parser.add_argument(option.flag, action="store_true", help=option.help)
            continue
        extra: dict[str, Any] = {"nargs": "?", "const": option.const} if option.const is not None else {}
        if option.nargs is not None:
            extra["nargs"] = option.nargs
        default = f" (default: {option.default})" if option.default not in (None, "", False) else ""
        parser.add_argument(
            option.flag,
            type=option.kind,
            default=option.default,
            choices=option.choices,
            metavar=option.metavar,
            help=option.help + default,
            **extra,
        )


def values_of(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The parsed values of the named options."""
    return {name: getattr(args, name) for name in names}


def error_line(message: str | BaseException, prog: str) -> int:
    """Prints an error in one line, headed ``prog``, the settings it names shown as flags; returns the exit status of
    a usage error."""
    print(f"{prog}: error: {as_flags(str(message).splitlines()[0] if str(message) else type(message).__name__)}",
          file=sys.stderr)
    return 2


def parser_error_line(message: str | BaseException, prog: str, parser: argparse.ArgumentParser) -> int:
    """:func:`error_line` for a command whose options are its own parser's rather than the option table's: each
    setting named as `` `name` `` is shown as the flag whose value it holds (``set_dir`` -> ``--set-dir``), or as
    the positional argument's name in the usage."""
    flags = {
        action.dest: max(action.option_strings, key=len) if action.option_strings else action.metavar or action.dest
        for action in parser._actions
        if action.dest != argparse.SUPPRESS
    }
    text = str(message).splitlines()[0] if str(message) else type(message).__name__
    text = re.sub(r"`([a-z_]+)`", lambda match: flags.get(match[1], match[0]), text)
    print(f"{prog}: error: {text.rstrip('.')}", file=sys.stderr)
    return 2


def note_printer(prog: str) -> Any:
    """A ``notify`` for the application layer: each note one line on stderr, headed ``prog``, with flags."""
    return lambda note: print(f"{prog}: {as_flags(note)}", file=sys.stderr)
