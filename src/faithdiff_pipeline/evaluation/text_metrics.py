"""Comparing recognised text with ground truth: normalisation, edit distance, word accuracy, CER and NED.

All of it is plain Python on Unicode code points, so that the numbers do not depend on an OCR engine or library:

* **normalisation** (:class:`TextNormalization`), applied to both texts before any comparison: Unicode NFKC (so that
  ligatures, full-width forms and composed/decomposed accents compare equal), every run of whitespace (spaces, tabs,
  line breaks) made one space, leading and trailing whitespace removed, and, unless ``case_sensitive``, case folded
  (``str.casefold``). Punctuation is kept: an OCR result with a stray ``.`` is a different string;
* **edit distance**: Levenshtein's, insertions, deletions and substitutions of one code point costing 1 each;
* **CER** (character error rate): edit distance / number of code points of the reference;
* **NED** (normalised edit distance, as the ICDAR 2019 robust reading challenges define it): edit distance /
  max(length of the reference, length of the prediction), in [0, 1]; ICDAR ranks by ``1 - NED``;
* **word accuracy**: the fraction of reference words recognised exactly (after normalisation).
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .metric_specs import OCR_METRICS

# The score names, in their column order.
_WORD_ACCURACY, _CER, _NED = OCR_METRICS


@dataclass(frozen=True)
class TextNormalization:
    """How texts are made comparable (see the module docstring).

    Attributes:
        case_sensitive: Keep case (``"Exit"`` differs from ``"EXIT"``); by default case is folded, as in ICDAR's
            case-insensitive word recognition protocols.
    """

    case_sensitive: bool = False

    def __call__(self, text: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str, got {type(text).__name__}.")
        text = " ".join(unicodedata.normalize("NFKC", text).split())
        return text if self.case_sensitive else text.casefold()

    def describe(self) -> str:
        case = "case-sensitive" if self.case_sensitive else "case-insensitive"
        return f"NFKC, whitespace collapsed, {case}"


def edit_distance(reference: str, prediction: str) -> int:
    """Levenshtein distance between two strings: the fewest insertions, deletions and substitutions of one code
    point that turn ``reference`` into ``prediction``."""
    if len(reference) < len(prediction):
        reference, prediction = prediction, reference
    # Two rows of the dynamic programme, the shorter string along them.
    previous = list(range(len(prediction) + 1))
    for i, ref_char in enumerate(reference, start=1):
        current = [i]
        for j, pred_char in enumerate(prediction, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_char != pred_char)))
        previous = current
    return previous[-1]


def character_error_rate(reference: str, prediction: str) -> float:
    """Edit distance / length of ``reference`` (which must not be empty); can exceed 1 for long predictions."""
    if not reference:
        raise ValueError("`reference` is empty; the character error rate is only defined for a non-empty reference.")
    return edit_distance(reference, prediction) / len(reference)


def normalized_edit_distance(reference: str, prediction: str) -> float:
    """Edit distance / max(len(reference), len(prediction)), in [0, 1]; 0 for two empty strings."""
    longest = max(len(reference), len(prediction))
    return edit_distance(reference, prediction) / longest if longest else 0.0


def word_scores(
    references: Sequence[str], predictions: Sequence[str], normalization: TextNormalization
) -> dict[str, float]:
    """The scores of one image read word by word (one prediction per ground-truth word box).

    Returns:
        ``{"word-acc": exact matches / words, "cer": total edit distance / total reference length,
        "ned": mean over the words of their NED}``, all after ``normalization``.
    """
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} reference words but {len(predictions)} predictions; expected one each.")
    pairs = [(normalization(ref), normalization(pred)) for ref, pred in zip(references, predictions)]
    if not pairs or any(not ref for ref, _ in pairs):
        raise ValueError("every reference word must have some text after normalisation, and there must be one.")
    distances = [edit_distance(ref, pred) for ref, pred in pairs]
    return {
        _WORD_ACCURACY: sum(ref == pred for ref, pred in pairs) / len(pairs),
        _CER: sum(distances) / sum(len(ref) for ref, _ in pairs),
        _NED: math.fsum(d / max(len(ref), len(pred)) for d, (ref, pred) in zip(distances, pairs)) / len(pairs),
    }


def page_scores(reference: str, prediction: str, normalization: TextNormalization) -> dict[str, float]:
    """The scores of one image read whole, its text compared with the image's reference text.

    Returns:
        ``{"word-acc": reference words found in the prediction (each found word used once) / reference words,
        "cer": CER of the whole texts, "ned": NED of the whole texts}``, all after ``normalization``; words are the
        space-separated parts of the normalised texts, so reading order matters for CER and NED but not for
        word accuracy.
    """
    reference, prediction = normalization(reference), normalization(prediction)
    if not reference:
        raise ValueError("the reference text is empty after normalisation; there is nothing to score.")
    wanted, found = Counter(reference.split()), Counter(prediction.split())
    matched = sum(min(count, found[word]) for word, count in wanted.items())
    return {
        _WORD_ACCURACY: matched / sum(wanted.values()),
        _CER: character_error_rate(reference, prediction),
        _NED: normalized_edit_distance(reference, prediction),
    }
