"""The evaluation harness of the paper: metrics, evaluation sets, reports and the ``faithdiff-eval`` command.

The public names are imported on first use, so that ``faithdiff-eval --help`` does not load torch.
"""

from typing import TYPE_CHECKING, Any

from .._imports import export_table, lazy_export

_import_structure = {
    "datasets": ["ImagePair", "PairedSet", "image_seed", "make_synthetic_set", "pair_folders", "read_tensor"],
    "metric_specs": ["METRICS", "MetricSpec", "MetricUnavailableError"],
    "metrics": ["load_metric", "psnr", "rgb_to_y", "ssim"],
    "report": ["markdown_table", "method_means", "read_csv", "write_csv"],
}
_exports = export_table(_import_structure)

# Spelled out for static tools; tests/test_startup.py checks it against the export table.
__all__ = [
    "ImagePair",
    "METRICS",
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
    "read_tensor",
    "rgb_to_y",
    "ssim",
    "write_csv",
]

if TYPE_CHECKING:
    from .datasets import ImagePair, PairedSet, image_seed, make_synthetic_set, pair_folders, read_tensor
    from .metric_specs import METRICS, MetricSpec, MetricUnavailableError
    from .metrics import load_metric, psnr, rgb_to_y, ssim
    from .report import markdown_table, method_means, read_csv, write_csv


def __getattr__(name: str) -> Any:
    return lazy_export(__name__, _exports, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_exports})
