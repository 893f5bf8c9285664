"""Seeds, in the three ways the package makes them.

* :func:`hashed_seed` hashes named parts (a run's seed, an image's name, a purpose): the same parts give the same
  seed in every process and on every machine, whatever else is drawn, so a set or a resumed run is reproducible.
* :func:`initial_seed` reads the seed a ``torch.Generator`` was started from, leaving the generator as it is.
* :func:`draw_seed` draws a new seed from a generator, advancing it like any other draw.

torch is imported only by the functions that need it, so that commands can import this module before any model loads.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_HASHED_SEED_MASK = (1 << 63) - 1
# The degradations' bound since their first version: another would change every degradation whose parameters are
# drawn through a seed (accelerator generators, or none).
_DRAWN_SEED_BOUND = 2**62


def hashed_seed(*parts: Any) -> int:
    """A 63-bit seed that depends only on ``parts``: the first 8 bytes (little-endian) of the SHA-256 of their
    ``str`` joined by ``"/"``. Unlike ``hash``, it is the same across processes, machines and Python runs.

    Args:
        parts: anything with a stable ``str``: integers, names, paths.
    """
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & _HASHED_SEED_MASK


def hashed_generator(*parts: Any, device: str | torch.device = "cpu") -> torch.Generator:
    """A new generator on ``device`` seeded with ``hashed_seed(*parts)``.

    Args:
        parts: as for :func:`hashed_seed`.
        device: the generator's device.
    """
    import torch

    return torch.Generator(device=device).manual_seed(hashed_seed(*parts))


def initial_seed(generator: torch.Generator | None) -> int | None:
    """The seed ``generator`` was started from (None without one). Reading it draws nothing, so one integer seed
    names the same value however much the generator has been used.

    Args:
        generator: the generator, or None.
    """
    return None if generator is None else generator.initial_seed()


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed in [0, 2**62) drawn from ``generator``, which advances it; None draws from torch's global CPU
    generator, so that ``torch.manual_seed`` decides it.

    Args:
        generator: the generator to draw from, on any device, or None.
    """
    import torch

    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, _DRAWN_SEED_BOUND, (1,), generator=generator, device=device).item())
