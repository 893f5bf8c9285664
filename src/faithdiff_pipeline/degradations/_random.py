"""Scalar random draws from an explicit ``torch.Generator``, shared by the kernel, noise and plan code."""

from __future__ import annotations

import torch

from ..seeds import draw_seed


def check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}.")


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def rand(generator: torch.Generator | None) -> float:
    """One draw from U[0, 1). Float64 so that narrow ranges keep their resolution."""
    return torch.rand((), dtype=torch.float64, generator=generator, device=_device(generator)).item()


def uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * rand(generator)


def bernoulli(generator: torch.Generator | None, prob: float) -> bool:
    # A draw is made even for prob 0 or 1 so that the stream of draws does not depend on the probabilities.
    return rand(generator) < prob


def choice(generator: torch.Generator | None, options: tuple | list, probs: tuple | list | None = None):
    """One of ``options``; uniform when ``probs`` is None."""
    u = rand(generator)
    if probs is None:
        return options[min(int(u * len(options)), len(options) - 1)]
    total = 0.0
    for option, prob in zip(options, probs):
        total += prob
        if u < total:
            return option
    # Rounding can leave the cumulative sum a hair under 1; the last option with mass takes the remainder.
    return next(option for option, prob in zip(reversed(options), reversed(probs)) if prob > 0)


def split_generators(
    generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """The generators for the scalar parameters (always on CPU) and for the noise fields.

    Parameters are drawn one scalar at a time, so drawing them on an accelerator would synchronise at every draw;
    an accelerator generator instead seeds a CPU generator with a single draw and keeps the noise fields for itself.
    Without a generator both are seeded from torch's global CPU generator, so ``torch.manual_seed`` reproduces them.
    """
    check_generator(generator)
    if generator is None:
        seed = draw_seed(None)
        params = torch.Generator().manual_seed(seed)
        noise = torch.Generator(device=device).manual_seed(seed + 1)
        return params, noise
    if generator.device.type == "cpu":
        return generator, generator
    return torch.Generator().manual_seed(draw_seed(generator)), generator
