"""Text evaluation sets: a folder of text images degraded like the synthetic sets, their ground truth carried along
(as the FaithDiff paper degrades ICDAR 2024 Occluded RoadText with the DASR levels)."""

from __future__ import annotations

import os
from pathlib import Path

from .datasets import SET_FOLDERS, PairedSet, check_set_dir, list_images, make_synthetic_set
from .ocr_truth import SET_BOXES_DIR, SET_TEXT_FILE, TextTruth, read_text_truth, write_set_truth


def make_text_set(
    hq_dir: str | os.PathLike,
    set_dir: str | os.PathLike,
    preset: str,
    truth: str | os.PathLike | TextTruth,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> PairedSet:
    """Builds a synthetic set from the text images of ``hq_dir`` (:func:`~.datasets.make_synthetic_set`: same
    crops, seeds, resumption and manifest) and writes their ground truth beside it
    (:func:`~.ocr_truth.write_set_truth`: ``text.json``, or word boxes in ``text/hq/`` and ``text/lq/``), where
    ``faithdiff-eval --ocr`` finds it.

    Args:
        hq_dir: The folder of source images.
        set_dir: The set's folder.
        preset: A degradation preset of :mod:`faithdiff_pipeline.degradations` (``"dasr-level3"``, ...).
        truth: The source images' ground truth: a JSON file of texts, a folder of ``gt_NAME.txt`` word boxes in the
            source images' pixels, or one already read by :func:`~.ocr_truth.read_text_truth`.
        seed: The seed of the set.
        overwrite: Replace a set made otherwise.
        progress: Show a progress bar.

    Raises:
        ValueError: the ground truth is unreadable, or lacks images of ``hq_dir`` or has nothing to read in some
            (checked before any image is degraded), the set's files would be written over the source images or
            their ground truth, or the set cannot be built.
    """
    inputs = [Path(hq_dir)]
    if not isinstance(truth, TextTruth):
        inputs.append(Path(truth))
        truth = read_text_truth(truth)
    truth.check_covers(list_images(hq_dir, "HQ folder"))
    check_set_dir(Path(set_dir), inputs, (*SET_FOLDERS, SET_TEXT_FILE, SET_BOXES_DIR))
    dataset = make_synthetic_set(hq_dir, set_dir, preset, seed, overwrite=overwrite, progress=progress)
    sizes = {pair.name: (pair.hq_size, pair.lq_size) for pair in dataset.pairs}
    write_set_truth(truth, Path(set_dir), sizes)
    return dataset
