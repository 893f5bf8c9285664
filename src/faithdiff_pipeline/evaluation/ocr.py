"""Reading an image's text with an OCR backend and scoring it against its ground truth.

With word boxes, each box that counts is read from its own crop: the axis-aligned rectangle around its four corners,
mapped from the HQ image's pixels to the read image's size (results have the HQ size, so this is the identity for
them), widened by :data:`CROP_MARGIN` of the box's height on every side (scene text touches its box, and OCR engines
read poorly up to the glyphs' edges), and cut to the image. Without boxes the whole image is read. The scores are
those of :mod:`.text_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass

import PIL.Image

from .ocr_backends import OcrBackend
from .ocr_truth import ImageText, TextTruth, WordBox
from .text_metrics import TextNormalization, page_scores, word_scores

# Margin added around each word box, as a fraction of its height, on every side.
CROP_MARGIN = 0.25


@dataclass(frozen=True)
class OcrReading:
    """What was read in one image: the reference texts and, in the same order, the backend's predictions (one of
    each per scored word, or one of each for a whole image)."""

    references: list[str]
    predictions: list[str]


def word_crop(image: PIL.Image.Image, word: WordBox, reference_size: tuple[int, int]) -> PIL.Image.Image | None:
    """The crop of ``image`` that holds ``word``, whose corners are in the pixels of an image of ``reference_size``
    (width, height); ``None`` when nothing of it lies inside ``image``."""
    scaled = word.scaled(image.width / reference_size[0], image.height / reference_size[1])
    left, top, right, bottom = scaled.bounds()
    margin = CROP_MARGIN * (bottom - top)
    box = (
        max(0, round(left - margin)),
        max(0, round(top - margin)),
        min(image.width, round(right + margin)),
        min(image.height, round(bottom + margin)),
    )
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    return image.crop(box)


def read_text(
    image: PIL.Image.Image, truth: ImageText, reference_size: tuple[int, int], backend: OcrBackend
) -> OcrReading:
    """Reads ``image`` as its ground truth asks: word by word when it has boxes, whole otherwise.

    A word whose crop would be empty (its box lies outside the image) reads as the empty string.
    """
    if truth.words is None:
        return OcrReading([truth.text], [backend.read_page(image)])
    words = truth.scored_words
    crops = [word_crop(image, word, reference_size) for word in words]
    return OcrReading([w.text for w in words], [backend.read_word(c) if c is not None else "" for c in crops])


def score_text(
    image: PIL.Image.Image,
    truth: ImageText,
    reference_size: tuple[int, int],
    backend: OcrBackend,
    normalization: TextNormalization,
) -> tuple[dict[str, float], OcrReading]:
    """The OCR scores of one image (word accuracy, CER, NED) and what was read.

    Args:
        image: The image to read (a restored image, or any image of the scene).
        truth: Its ground truth.
        reference_size: The (width, height) the ground truth's box corners are measured in (the HQ image's).
        backend: The OCR engine, loaded.
        normalization: How texts are made comparable.
    """
    reading = read_text(image, truth, reference_size, backend)
    if truth.words is None:
        scores = page_scores(reading.references[0], reading.predictions[0], normalization)
    else:
        scores = word_scores(reading.references, reading.predictions, normalization)
    return scores, reading


@dataclass(frozen=True)
class OcrEvaluation:
    """The OCR part of an evaluation run: the engine, the ground truth of the set and the normalisation."""

    backend: OcrBackend
    truth: TextTruth
    normalization: TextNormalization

    def describe(self) -> str:
        unit = "word boxes" if self.truth.kind == "words" else "whole images"
        return f"OCR by {self.backend.describe()} on {unit}; text compared {self.normalization.describe()}"
