"""The shared argument checks (their wording and what they accept) and the three kinds of seed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from faithdiff_pipeline.checks import (
    check_bool,
    check_choice,
    check_choices,
    check_distribution,
    check_integer,
    check_positive,
    check_probability,
    check_range,
    is_integer,
    is_number,
)
from faithdiff_pipeline.evaluation import image_seed
from faithdiff_pipeline.seeds import draw_seed, hashed_generator, hashed_seed, initial_seed


class _SetupError(ValueError):
    """Stands for a module's own ValueError subclass, such as the training configuration's."""


# ---------------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize(
    "kwargs, value, message",
    [
        ({"minimum": 1}, 0, "`n` must be a positive integer, got 0."),
        ({"minimum": 1, "odd": True}, 8, "`n` must be a positive odd integer, got 8."),
        ({"minimum": 8}, 7, "`n` must be an integer >= 8, got 7."),
        ({"minimum": 0}, -1, "`n` must be an integer >= 0, got -1."),
        ({"minimum": 1, "maximum": 100}, 101, "`n` must be an integer from 1 to 100, got 101."),
        ({"maximum": 3}, 4, "`n` must be an integer <= 3, got 4."),
        ({}, 2.0, "`n` must be an integer, got 2.0."),
        ({"minimum": 1}, True, "`n` must be a positive integer, got True."),
    ],
)
def test_integer_messages_name_the_argument_value_and_expectation(kwargs: dict, value, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        check_integer(value, "n", **kwargs)
    assert str(raised.value) == message


def test_accepted_values_come_back_and_booleans_are_not_numbers() -> None:
    assert check_integer(7, "n", 1, odd=True) == 7 and check_integer(100, "n", 1, 100) == 100
    assert check_positive(0.5, "x") == 0.5 and check_probability(1, "p") == 1
    assert is_integer(3) and not is_integer(True) and not is_integer(3.0) and not is_integer(np.int64(3))
    assert is_number(2.5) and is_number(np.float64(2.5)) and not is_number(False) and not is_number("1")
    for check in (check_positive, check_probability):
        with pytest.raises(ValueError, match="got True"):
            check(True, "x")


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "2"])
def test_positive_numbers_are_finite(value) -> None:
    with pytest.raises(ValueError, match=f"`sigma` must be a finite number > 0, got {value!r}"):
        check_positive(value, "sigma")


def test_probabilities_and_distributions() -> None:
    with pytest.raises(ValueError, match=r"`p` must be a probability in \[0, 1\], got 1.5\.$"):
        check_probability(1.5, "p")
    with pytest.raises(ValueError, match=r"`p` must be a probability in \[0, 1\], got nan"):
        check_probability(float("nan"), "p")
    assert check_distribution([0.25, 0.75], "probs", 2) == (0.25, 0.75)
    with pytest.raises(ValueError, match=r"`probs` must sum to 1, got \[0.5, 0.4\] \(sum 0.9\)"):
        check_distribution((0.5, 0.4), "probs", 2)
    with pytest.raises(ValueError, match="`probs` must be a list of 3 probabilities"):
        check_distribution((0.5, 0.5), "probs", 3)
    with pytest.raises(ValueError, match=r"`probs` must be a probability in \[0, 1\], got -0.5"):
        check_distribution((-0.5, 1.5), "probs", 2)


def test_ranges_are_ordered_finite_pairs_within_their_bounds() -> None:
    assert check_range([1, 2], "r") == (1.0, 2.0) and isinstance(check_range([1, 2], "r")[0], float)
    assert check_range((0.0, 1.0), "r", low=0.0) == (0.0, 1.0)
    cases = [
        (((0.0, 1.0),), {"low": 0.0, "open_low": True}, r"`r` must lie > 0, got \[0.0, 1.0\]"),
        (((-1, 1),), {"low": 0.0}, r"`r` must lie >= 0, got \[-1, 1\]"),
        (((60, 110),), {"high": 100.0}, r"`r` must lie <= 100, got \[60, 110\]"),
        (((15.0, 1.0),), {}, r"`r` must have low <= high, got \[15.0, 1.0\]"),
        (((1.0, float("inf")),), {}, r"`r` must be a \(low, high\) pair of finite numbers"),
        (((1.0, 2.0, 3.0),), {}, r"`r` must be a \(low, high\) pair of finite numbers"),
    ]
    for (value,), kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            check_range(value, "r", **kwargs)


def test_choices_and_bools() -> None:
    assert check_choice("png", "format", {"png": ".png", "tiff": ".tif"}) == "png"
    with pytest.raises(ValueError, match=r"^`format` must be one of \('png', 'tiff'\), got 'gif'\.$"):
        check_choice("gif", "format", {"png": ".png", "tiff": ".tif"})
    assert check_choices(["iso"], "kernels", ("iso", "aniso")) == ("iso",)
    with pytest.raises(ValueError, match=r"`kernels` must be a non-empty list of kernel types from \('iso',"):
        check_choices(("iso", "box"), "kernels", ("iso", "aniso"), what="kernel types")
    with pytest.raises(ValueError, match=r"`modes` must be a non-empty list from \('area',\), got \(\)"):
        check_choices((), "modes", ("area",))
    assert check_bool(False, "flag") is False
    with pytest.raises(TypeError, match="`flag` must be a bool, got 1."):
        check_bool(1, "flag")


def test_every_check_raises_the_callers_exception_class() -> None:
    calls = [
        lambda: check_integer(0, "n", 1, error=_SetupError),
        lambda: check_positive(0, "x", error=_SetupError),
        lambda: check_probability(2, "p", error=_SetupError),
        lambda: check_distribution((0.5,), "d", 1, error=_SetupError),
        lambda: check_range((2, 1), "r", error=_SetupError),
        lambda: check_choice("c", "o", ("a", "b"), error=_SetupError),
        lambda: check_choices(["c"], "o", ("a", "b"), error=_SetupError),
        lambda: check_bool("yes", "b", error=_SetupError),
    ]
    for call in calls:
        with pytest.raises(_SetupError):
            call()


# ----------------------------------------------------------------------------------------------------- seeds
def test_hashed_seeds_are_the_sha256_of_the_parts_and_stay_what_they_were() -> None:
    # Prepared sets, resumed runs and evaluation sets depend on these values: they must never change.
    assert hashed_seed(0, "a", 3) == 4359842351621933984
    assert hashed_seed("x") == 4949498559009812781
    digest = hashlib.sha256(b"5/faces/face.png/face-lq/1").digest()
    assert hashed_seed(5, "faces/face.png", "face-lq", 1) == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    assert hashed_seed(7, "photo.png") == image_seed(7, "photo.png")  # the evaluation sets' seed is the same hash
    assert hashed_seed(1, 23) != hashed_seed(12, 3)  # the separator keeps parts apart
    generator = hashed_generator(0, "a", 3)
    assert generator.initial_seed() == hashed_seed(0, "a", 3) and generator.device.type == "cpu"


def test_initial_seed_reads_without_drawing_and_draw_seed_draws() -> None:
    generator = torch.Generator().manual_seed(11)
    torch.rand(3, generator=generator)
    state = generator.get_state()
    assert initial_seed(generator) == 11 and initial_seed(None) is None
    assert torch.equal(generator.get_state(), state)  # reading the seed drew nothing

    first, second = draw_seed(generator), draw_seed(generator)
    assert first != second and not torch.equal(generator.get_state(), state)
    again = torch.Generator().manual_seed(11)
    torch.rand(3, generator=again)
    assert draw_seed(again) == first
    # The degradations' seeds for accelerator generators: one draw in [0, 2**62), as they have always been made.
    assert draw_seed(torch.Generator().manual_seed(0)) == 900450186894289455
    assert all(0 <= draw_seed(torch.Generator().manual_seed(s)) < 2**62 for s in range(20))
    torch.manual_seed(4)
    global_first = draw_seed(None)
    torch.manual_seed(4)
    assert draw_seed(None) == global_first
