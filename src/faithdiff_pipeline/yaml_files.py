"""Reading YAML settings files (training configurations, degradation models) with one-line errors.

A syntax error in a YAML file is the user's mistake in one place of one file: the message names the file, the line
and the column, instead of pyyaml's multi-line traceback.
"""

from __future__ import annotations

import os
from typing import Any


def read_yaml(path: str | os.PathLike, name: str, error: type[Exception] = ValueError) -> Any:
    """The content of the YAML file ``path`` (needs ``pyyaml``), ``None`` for an empty file.

    Args:
        path: the file.
        name: how the messages name it (``"`--config`"``, ``"Degradation settings file"``).
        error: the exception class to raise (``ValueError`` or a subclass).

    Raises:
        error: one line naming ``name``, the file and, for a syntax error, its line and column (counted from 1).
    """
    import yaml

    shown = repr(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as failure:
        raise error(f"{name} {shown} is not UTF-8 text ({failure.reason}); expected a YAML file.") from failure
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as failure:
        raise error(f"{name} {shown} is not valid YAML: {_where(failure)}; correct the file there.") from failure


def _where(failure: Exception) -> str:
    """Where and what pyyaml's error is, on one line: ``line 3, column 2: expected ',' or ']' (...)``."""
    mark = getattr(failure, "problem_mark", None)
    problem = getattr(failure, "problem", None) or str(failure)
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem
    context, context_mark = getattr(failure, "context", None), getattr(failure, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context} started at line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        text += f" ({context})"
    return " ".join(text.split())
