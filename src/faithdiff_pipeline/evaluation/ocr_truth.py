"""Ground-truth text of an evaluation set: one text per image (a JSON manifest) or word boxes (ICDAR-style files).

Two forms, told apart by the path:

* a **JSON file** ``{"NAME": "text of the image", ...}``: each image is read whole and its text compared with this
  one (NAME is the image's file name without extension; a key with an image extension is taken without it);
* a **folder of ICDAR 2015-style files** ``gt_NAME.txt``: one word per line, ``x1,y1,x2,y2,x3,y3,x4,y4,transcription``
  (the four corners of the word, in pixels of the HQ image, clockwise from the top left; the transcription is
  everything after the eighth comma, so it may hold commas), a UTF-8 byte-order mark allowed; a transcription of
  ``###`` marks a word that cannot be read, left out of the scores ("don't care"), as is an empty one. Each word is
  read from its own crop.

An image whose ground truth has nothing to score (an empty text, or only ``###`` words) is an error: its scores would
be undefined.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..atomic_files import write_text_atomic
from ..image_io import READABLE_SUFFIXES
from .datasets import format_names, missing_names

DONT_CARE = "###"
ICDAR_PREFIX = "gt_"
# Where a text set (``make_text_set``) keeps its ground truth, beside hq/ and lq/.
SET_TEXT_FILE = "text.json"
SET_BOXES_DIR = "text"

TruthKind = Literal["page", "words"]


@dataclass(frozen=True)
class WordBox:
    """One ground-truth word: its quadrilateral ``points`` ((x, y) corners in pixels) and its transcription."""

    points: tuple[tuple[float, float], ...]
    text: str

    @property
    def ignored(self) -> bool:
        """Whether the word is left out of the scores: "don't care" (``###``) or without text."""
        return self.text == DONT_CARE or not self.text.strip()

    def bounds(self) -> tuple[float, float, float, float]:
        """The axis-aligned rectangle around the quadrilateral: ``(left, top, right, bottom)``."""
        xs, ys = [x for x, _ in self.points], [y for _, y in self.points]
        return min(xs), min(ys), max(xs), max(ys)

    def scaled(self, factor_x: float, factor_y: float) -> WordBox:
        """The same word in an image resized by ``factor_x`` horizontally and ``factor_y`` vertically."""
        return WordBox(tuple((x * factor_x, y * factor_y) for x, y in self.points), self.text)

    def clipped(self, width: int, height: int) -> WordBox:
        """The word with its corners moved inside an image of ``width`` x ``height`` pixels."""
        return WordBox(tuple((min(max(x, 0), width), min(max(y, 0), height)) for x, y in self.points), self.text)


@dataclass(frozen=True)
class ImageText:
    """The ground truth of one image: its whole ``text`` (page form) or its ``words`` (box form)."""

    text: str | None = None
    words: tuple[WordBox, ...] | None = None

    @property
    def scored_words(self) -> list[WordBox]:
        """The words that count: all but the "don't care" ones."""
        return [word for word in self.words or () if not word.ignored]

    def has_text(self) -> bool:
        """Whether there is anything to score."""
        return bool(self.text.strip()) if self.words is None else bool(self.scored_words)


@dataclass(frozen=True)
class TextTruth:
    """The ground truth of a set of images, by image name; ``kind`` is ``"page"`` (JSON) or ``"words"`` (boxes)."""

    kind: TruthKind
    images: dict[str, ImageText]
    source: Path

    def check_covers(self, names: Iterable[str]) -> None:
        """Checks that every image of ``names`` has ground truth with something to score.

        Raises:
            ValueError: some images have none, or only an empty text or "don't care" words (all are named).
        """
        names = list(names)
        if absent := missing_names(names, self.images):
            raise ValueError(
                f"the ground-truth text {str(self.source)!r} lacks {len(absent)} image(s) of the set: "
                f"{format_names(absent)} (text is matched to images by file name without extension)."
            )
        if empty := sorted(name for name in names if not self.images[name].has_text()):
            raise ValueError(
                f"the ground-truth text {str(self.source)!r} of {len(empty)} image(s) has nothing to read (empty, "
                f"or only '{DONT_CARE}' words): {format_names(empty)}; leave those images out of the set."
            )


def read_text_truth(path: str | os.PathLike) -> TextTruth:
    """The ground truth at ``path``: a JSON file of texts, or a folder of ``gt_NAME.txt`` word-box files.

    Raises:
        ValueError: the path is neither, or a file is not in its format (the message names the file and line).
    """
    path = Path(path)
    if path.is_file():
        return TextTruth("page", _read_page_manifest(path), path)
    if path.is_dir():
        return TextTruth("words", _read_box_folder(path), path)
    raise ValueError(
        f"ground-truth text {str(path)!r} does not exist; expected a JSON file of texts or a folder of "
        f"{ICDAR_PREFIX}NAME.txt word-box files."
    )


def _image_name(key: str) -> str:
    stem, suffix = os.path.splitext(key)
    return stem if suffix.lower() in READABLE_SUFFIXES else key


def _read_page_manifest(path: Path) -> dict[str, ImageText]:
    expected = 'a JSON object {"NAME": "text of the image", ...}'
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"ground-truth text {str(path)!r} is not JSON ({error}); expected {expected}.") from error
    if not isinstance(data, dict) or not data:
        raise ValueError(f"ground-truth text {str(path)!r} holds {type(data).__name__}; expected {expected}.")
    if not_text := [key for key, text in data.items() if not isinstance(text, str)]:
        raise ValueError(
            f"ground-truth text {str(path)!r}: the values of {format_names(not_text)} are not strings; "
            f"expected {expected}."
        )
    images: dict[str, ImageText] = {}
    for key, text in data.items():
        name = _image_name(key)
        if name in images:
            raise ValueError(f"ground-truth text {str(path)!r} names image {name!r} twice; keep one of them.")
        images[name] = ImageText(text=text)
    return images


def _read_box_folder(folder: Path) -> dict[str, ImageText]:
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.startswith(ICDAR_PREFIX) and p.suffix == ".txt"
    )
    if not files:
        raise ValueError(
            f"ground-truth folder {str(folder)!r} holds no {ICDAR_PREFIX}NAME.txt files (one per image, ICDAR style)."
        )
    return {p.stem[len(ICDAR_PREFIX) :]: ImageText(words=parse_icdar_words(p)) for p in files}


def parse_icdar_words(path: str | os.PathLike) -> tuple[WordBox, ...]:
    """The words of one ICDAR 2015-style file (``x1,y1,...,x4,y4,transcription`` per line; blank lines skipped).

    Raises:
        ValueError: a line has fewer than nine fields or a coordinate is not a number (file and line are named).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"ground-truth file {str(path)!r} is not UTF-8 text ({error}).") from error
    words = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split(",", 8)
        try:
            values = [float(field) for field in fields[:8]]
        except ValueError:
            values = []
        if len(fields) < 9 or len(values) < 8 or not all(math.isfinite(v) for v in values):
            raise ValueError(
                f"line {number} of ground-truth file {str(path)!r} is {line[:60]!r}; expected "
                "x1,y1,x2,y2,x3,y3,x4,y4,transcription (numbers, then the text or ###)."
            )
        words.append(WordBox(tuple(zip(values[0::2], values[1::2])), fields[8]))
    return tuple(words)


def format_icdar_words(words: Iterable[WordBox]) -> str:
    """The lines of an ICDAR 2015-style file for ``words``, corners rounded to whole pixels."""
    return "".join(
        ",".join(str(round(v)) for point in word.points for v in point) + f",{word.text}\n" for word in words
    )


def write_set_truth(
    truth: TextTruth, set_dir: str | os.PathLike, sizes: dict[str, tuple[tuple[int, int], tuple[int, int]]]
) -> Path:
    """Writes the ground truth of a built set beside its ``hq/`` and ``lq/`` folders.

    Args:
        truth: The ground truth of the source images (box corners in source pixels).
        set_dir: The set's folder.
        sizes: ``{name: ((hq width, hq height), (lq width, lq height))}`` of every image of the set.

    A page truth becomes ``text.json`` (the set's images only). Boxes become ``text/hq/gt_NAME.txt``, clipped to the
    HQ image (cut from the top-left of the source, so the corners keep their coordinates), and
    ``text/lq/gt_NAME.txt``, scaled to the LQ image and rounded to whole pixels. The other kind's files of the set's
    images are removed; no other file is.

    Returns:
        Where :func:`set_truth_path` finds it: the JSON file, or the folder of HQ boxes.
    """
    set_dir = Path(set_dir)
    page, boxes = set_dir / SET_TEXT_FILE, set_dir / SET_BOXES_DIR
    if truth.kind == "page":
        for role in ("hq", "lq"):
            for name in sizes:
                (boxes / role / f"{ICDAR_PREFIX}{name}.txt").unlink(missing_ok=True)
        for folder in (boxes / "hq", boxes / "lq", boxes):  # the folders too, when nothing else is in them
            with contextlib.suppress(OSError):
                folder.rmdir()
        texts = {name: truth.images[name].text for name in sorted(sizes)}
        write_text_atomic(page, json.dumps(texts, indent=2, ensure_ascii=False) + "\n")
        return page
    page.unlink(missing_ok=True)
    for role in ("hq", "lq"):
        (boxes / role).mkdir(parents=True, exist_ok=True)
    for name, ((hq_w, hq_h), (lq_w, lq_h)) in sizes.items():
        hq_words = [word.clipped(hq_w, hq_h) for word in truth.images[name].words]
        lq_words = [word.scaled(lq_w / hq_w, lq_h / hq_h) for word in hq_words]
        write_text_atomic(boxes / "hq" / f"{ICDAR_PREFIX}{name}.txt", format_icdar_words(hq_words))
        write_text_atomic(boxes / "lq" / f"{ICDAR_PREFIX}{name}.txt", format_icdar_words(lq_words))
    return boxes / "hq"


def set_truth_path(hq_dir: str | os.PathLike) -> Path | None:
    """The ground truth that :func:`write_set_truth` left in the set whose HQ folder is ``hq_dir``, if any."""
    hq_dir = Path(hq_dir).resolve()
    if hq_dir.name != "hq":
        return None
    page, boxes = hq_dir.parent / SET_TEXT_FILE, hq_dir.parent / SET_BOXES_DIR / "hq"
    return page if page.is_file() else boxes if boxes.is_dir() else None
