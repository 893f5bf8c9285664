"""Checks of settings and arguments, with one wording across the package.

Every ``check_*`` function takes the same first arguments: ``value``, the value to check, and ``name``, the
argument's name as the caller knows it (``"scale"``, ``"resize_prob2"``); and, keyword-only, ``error``, the exception
class to raise: ``ValueError`` by default (``TypeError`` for :func:`check_bool`), or a subclass such as the training
configuration's ``TrainingSetupError``. A check returns the value it accepted and otherwise raises a one-line error
that names the argument, the value and what was expected, e.g. ``ValueError: `scale` must be a positive integer,
got 0.``. ``is_integer`` and ``is_number`` are the type tests behind them, for checks whose wording is their own
(``tile_size``'s multiple of 8, say).

Booleans are ``int`` in Python, but no check here takes ``True`` for 1: a flag given where a number belongs is a
mistake. The module imports nothing heavy, so that commands can check their arguments before loading any model.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

_PROBABILITY_SUM_TOLERANCE = 1e-6


def is_integer(value: Any) -> bool:
    """Whether ``value`` is a Python ``int`` other than a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a Python ``int`` or ``float`` (NumPy's float64 included) other than a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a finite real number of any type (NumPy's scalars included) other than a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _integer_phrase(minimum: int | None, maximum: int | None, odd: bool) -> str:
    kind = "odd integer" if odd else "integer"
    if minimum is not None and maximum is not None:
        return f"an {kind} from {minimum} to {maximum}"
    if minimum == 1:
        return f"a positive {kind}"
    if minimum is not None:
        return f"an {kind} >= {minimum}"
    if maximum is not None:
        return f"an {kind} <= {maximum}"
    return f"an {kind}"


def check_integer(
    value: Any,
    name: str,
    minimum: int | None = None,
    maximum: int | None = None,
    *,
    odd: bool = False,
    error: type[Exception] = ValueError,
) -> int:
    """``value`` if it is an integer (not a bool) in [``minimum``, ``maximum``], odd when ``odd`` is set.

    Args:
        minimum: the smallest accepted value; None for no bound. 1 reads as "a positive integer".
        maximum: the largest accepted value; None for no bound.
        odd: whether only odd values are accepted.
    """
    if (
        not is_integer(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
        or (odd and value % 2 == 0)
    ):
        raise error(f"`{name}` must be {_integer_phrase(minimum, maximum, odd)}, got {value!r}.")
    return value


def check_positive(value: Any, name: str, *, error: type[Exception] = ValueError) -> float:
    """``value`` if it is a finite number > 0."""
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise error(f"`{name}` must be a finite number > 0, got {value!r}.")
    return value


def check_probability(value: Any, name: str, *, error: type[Exception] = ValueError) -> float:
    """``value`` if it is a number in [0, 1]."""
    if not is_number(value) or not 0.0 <= value <= 1.0:
        raise error(f"`{name}` must be a probability in [0, 1], got {value!r}.")
    return value


def check_distribution(
    value: Any, name: str, length: int, *, error: type[Exception] = ValueError
) -> tuple[float, ...]:
    """``value`` as a tuple if it is a list or tuple of ``length`` probabilities that sum to 1 (within 1e-6).

    Args:
        length: how many probabilities there must be (one per option they choose between).
    """
    if not isinstance(value, (tuple, list)) or len(value) != length:
        raise error(f"`{name}` must be a list of {length} probabilities, got {value!r}.")
    for probability in value:
        check_probability(probability, name, error=error)
    total = math.fsum(value)
    if abs(total - 1.0) > _PROBABILITY_SUM_TOLERANCE:
        raise error(f"`{name}` must sum to 1, got {list(value)} (sum {total:g}).")
    return tuple(value)


def check_range(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    error: type[Exception] = ValueError,
) -> tuple[float, float]:
    """``value`` as a ``(low, high)`` tuple of floats if it is a pair of finite numbers with low <= high inside the
    bounds.

    Args:
        low: the smallest value the pair may reach; None for no bound.
        high: the largest value the pair may reach; None for no bound.
        open_low: whether ``low`` itself is excluded (for ranges of values that must be > 0).
    """
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(is_number(v) and math.isfinite(v) for v in value)
    ):
        raise error(f"`{name}` must be a (low, high) pair of finite numbers, got {value!r}.")
    if value[0] > value[1]:
        raise error(f"`{name}` must have low <= high, got {list(value)}.")
    if low is not None and (value[0] < low or (open_low and value[0] == low)):
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        raise error(f"`{name}` must lie {bound}, got {list(value)}.")
    if high is not None and value[1] > high:
        raise error(f"`{name}` must lie <= {high:g}, got {list(value)}.")
    return float(value[0]), float(value[1])


def check_choice(value: Any, name: str, options: Collection[Any], *, error: type[Exception] = ValueError) -> Any:
    """``value`` if it is one of ``options``.

    Args:
        options: the accepted values, listed in the message in their order.
    """
    if value not in options:
        raise error(f"`{name}` must be one of {tuple(options)}, got {value!r}.")
    return value


def check_choices(
    value: Any,
    name: str,
    options: Collection[Any],
    *,
    what: str | None = None,
    error: type[Exception] = ValueError,
) -> tuple[Any, ...]:
    """``value`` as a tuple if it is a non-empty list or tuple of items of ``options``.

    Args:
        options: the accepted items.
        what: what the items are, for the message ("kernel types"); None leaves it out.
    """
    if not isinstance(value, (tuple, list)) or not value or any(item not in options for item in value):
        items = f" of {what}" if what else ""
        raise error(f"`{name}` must be a non-empty list{items} from {tuple(options)}, got {value!r}.")
    return tuple(value)


def check_bool(value: Any, name: str, *, error: type[Exception] = TypeError) -> bool:
    """``value`` if it is a bool (1, 0 and strings are refused: they are a type mistake, hence TypeError)."""
    if not isinstance(value, bool):
        raise error(f"`{name}` must be a bool, got {value!r}.")
    return value


# The smallest latent tile the pipeline blends (in pixels): 8 latents.
MIN_TILE_SIZE = 64


def check_tile_arguments(tile_size: object, tile_stride: object) -> None:
    """Refuses latent tile sizes and strides (in pixels) that the pipeline cannot use, naming the argument."""
    if not is_integer(tile_size) or tile_size < MIN_TILE_SIZE or tile_size % 8:
        raise ValueError(f"`tile_size` must be a multiple of 8 of at least {MIN_TILE_SIZE} pixels, got {tile_size!r}.")
    if tile_stride is not None and (
        not is_integer(tile_stride) or not 8 <= tile_stride <= tile_size or tile_stride % 8
    ):
        raise ValueError(
            f"`tile_stride` must be a multiple of 8 between 8 and `tile_size` ({tile_size}) pixels, got {tile_stride!r}."
        )
