"""Fixtures shared by the tests; the helpers they use live in tiny_models.py and shared_data.py."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach the network: a stray Hub request fails at once instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import pytest

from faithdiff_pipeline import FaithDiffSDXLPipeline
from tiny_models import tiny_components


@pytest.fixture
def tiny_pipe() -> FaithDiffSDXLPipeline:
    pipe = FaithDiffSDXLPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def lq_image() -> PIL.Image.Image:
    """A small, structured RGB test image (24 x 20), independent of ../shared."""
    y, x = np.mgrid[0:20, 0:24]
    rgb = np.stack([x * 10, y * 12, (x * y) % 256], axis=-1).astype(np.uint8)
    return PIL.Image.fromarray(rgb)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved pipeline folder of the tiny components, for command-line tests."""
    folder = tmp_path_factory.mktemp("tiny-model")
    FaithDiffSDXLPipeline(**tiny_components()).save_pretrained(folder)
    return folder
