"""The evaluation harness of the paper: metrics, evaluation sets, reports and the ``faithdiff-eval`` command."""

from .datasets import ImagePair, PairedSet, image_seed, make_synthetic_set, pair_folders, read_image
from .metrics import METRICS, MetricSpec, MetricUnavailableError, load_metric, psnr, rgb_to_y, ssim
from .report import markdown_table, method_means, read_csv, write_csv

__all__ = [
    "METRICS",
    "ImagePair",
    "MetricSpec",
    "MetricUnavailableError",
    "PairedSet",
    "image_seed",
    "load_metric",
    "make_synthetic_set",
    "markdown_table",
    "method_means",
    "pair_folders",
    "psnr",
    "read_csv",
    "read_image",
    "rgb_to_y",
    "ssim",
    "write_csv",
]
