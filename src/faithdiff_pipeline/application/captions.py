"""The prompt of every image of a job, read once: a fixed prompt, no prompt, the image's caption sidecar, or a new
caption by the captioner, written as its sidecar.

One error policy: a sidecar that cannot be read or parsed, or one missing where sidecars are required, fails that
image alone, with one line naming the sidecar; the others go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from . import locations
from .photos import DecodedPhotos
from .settings import RestorationSettings

if TYPE_CHECKING:
    import torch

    from ..loading import CaptionerPlan


def sidecar_of(location: str) -> str:
    """The caption sidecar's location: ``photo.jpg`` -> ``photo.json`` beside it (the release's layout)."""
    return locations.beside(location, f"{PurePosixPath(locations.name_of(location)).stem}.json")


def _read_text(location: str) -> str:
    if not locations.is_uri(location):
        with open(location, encoding="utf-8") as stream:
            return stream.read()
    filesystem, path = locations.locate(location)
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


@dataclass
class Prompts:
    """The prompts of a job's images by location; ``needed`` lists the images still to caption, ``failed`` the
    images that cannot be restored with the reason."""

    known: dict[str, str] = field(default_factory=dict)
    needed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def read_prompts(sources: Sequence[str], settings: RestorationSettings) -> Prompts:
    """Reads each image's prompt as ``settings`` say, each sidecar once."""
    from ..captioning import prompt_from_sidecar

    prompts = Prompts()
    for source in sources:
        if settings.prompt is not None or settings.caption == "none":
            prompts.known[source] = settings.prompt or ""
            continue
        sidecar = sidecar_of(source)
        try:
            if locations.is_file(sidecar):
                prompts.known[source] = prompt_from_sidecar(_read_text(sidecar), sidecar)
            elif settings.caption == "sidecar":
                prompts.failed.append((locations.name_of(source), f"no caption sidecar {locations.name_of(sidecar)}"))
            elif settings.wants_captions:
                prompts.needed.append(source)
            else:
                prompts.known[source] = ""
        except (ValueError, OSError, UnicodeDecodeError) as error:
            prompts.failed.append((locations.name_of(source), str(error).splitlines()[0]))
    return prompts


def caption_images(
    prompts: Prompts,
    settings: RestorationSettings,
    device: torch.device,
    plan: CaptionerPlan,
    photos: DecodedPhotos,
    notify: Callable[[str], None],
) -> None:
    """Captions every image of ``prompts.needed`` and writes its sidecar (the release's format), then frees the
    captioner, so that its memory peak and the restoration's never add up. Without a captioner in ``plan`` the images
    are restored without a prompt. A caption whose sidecar cannot be written (a read-only folder) is used all the
    same, and ``notify`` says so; an image that fails moves to ``prompts.failed``. Local images only."""
    from tqdm.auto import tqdm

    from .. import loading
    from ..captioning import clean_caption, write_caption

    needed, prompts.needed = prompts.needed, []
    if plan.model is None:
        prompts.known.update((source, "") for source in needed)
        return
    if not needed:
        return
    captioner = loading.load_planned_captioner(plan, device, loading.resolve_dtype(settings.dtype, device))
    clean = loading.load_preclean(settings.preclean, device) if settings.preclean else None
    unwritten = 0
    try:
        for source in tqdm(needed, desc="captions", unit="image"):
            try:
                image = photos.take(source, keep=True).to_pil()
                raw = captioner.raw_captions([clean(image) if clean else image], seed=settings.seed)[0]
            except (ValueError, OSError, RuntimeError) as error:
                prompts.failed.append((locations.name_of(source), f"captioning failed: {_first_line(error)}"))
                continue
            prompts.known[source] = clean_caption(raw)
            try:
                write_caption(source, raw)
            except OSError:
                unwritten += 1
    finally:
        loading.release(captioner)
    if unwritten:
        notify(f"{unwritten} caption sidecar(s) could not be written beside the inputs; their captions are used")


def _first_line(error: Any) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
