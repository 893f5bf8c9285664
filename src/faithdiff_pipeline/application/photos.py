"""Photos read once per run: the caption stage decodes an image for the captioner and the restoration stage takes
the same decoded image, as long as what is kept between the two stages fits a memory budget (a large folder cannot
be held in memory whole; past the budget an image is decoded again)."""

from __future__ import annotations

from ..image_io import ImageFile, read_image

# What the photos kept between the caption and restoration stages may hold: about 40 photos of 12 megapixels.
KEPT_BYTES = 1536 * 2**20


class DecodedPhotos:
    """The photos of one run, each decoded once where the budget allows. Belongs to one run (one thread)."""

    def __init__(self, budget: int = KEPT_BYTES) -> None:
        self.budget = budget
        self._kept: dict[str, ImageFile] = {}

    def _size(self) -> int:
        return sum(photo.pixels.nbytes + (0 if photo.alpha is None else photo.alpha.nbytes) for photo in self._kept.values())

    def take(self, path: str, keep: bool = False) -> ImageFile:
        """The photo at ``path``: the kept copy (handed over, unless ``keep``), else decoded now, and kept for a later
        stage when ``keep`` and it fits the budget. An unreadable image raises ``ValueError``."""
        photo = self._kept.get(path) if keep else self._kept.pop(path, None)
        if photo is not None:
            return photo
        try:
            photo = read_image(path)
        except ValueError as error:
            raise ValueError(f"not a readable image ({error})") from error
        if keep and self._size() + photo.pixels.nbytes <= self.budget:
            self._kept[path] = photo
        return photo
