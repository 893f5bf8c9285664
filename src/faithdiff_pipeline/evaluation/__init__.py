"""The evaluation harness of the paper: metrics, OCR scores, evaluation sets, reports and the ``faithdiff-eval``
command.

The public names are imported on first use, so that ``faithdiff-eval --help`` does not load torch.
"""

from typing import TYPE_CHECKING, Any

from .._imports import export_table, lazy_export

_import_structure = {
    "datasets": ["ImagePair", "PairedSet", "image_seed", "make_synthetic_set", "pair_folders", "read_tensor"],
    "metric_specs": ["METRICS", "MetricSpec", "MetricUnavailableError", "OCR_METRICS"],
    "metrics": ["load_metric", "psnr", "rgb_to_y", "ssim"],
    "ocr": ["score_text"],
    "ocr_backends": [
        "OCR_BACKENDS",
        "OcrBackend",
        "OcrUnavailableError",
        "PaddleOcrBackend",
        "TesseractBackend",
        "create_backend",
    ],
    "ocr_truth": ["ImageText", "TextTruth", "WordBox", "read_text_truth"],
    "report": ["markdown_table", "method_means", "read_csv", "write_csv"],
    "text_metrics": ["TextNormalization", "character_error_rate", "edit_distance", "normalized_edit_distance"],
    "text_sets": ["make_text_set"],
}
_exports = export_table(_import_structure)

# Spelled out for static tools; tests/test_startup.py checks it against the export table.
__all__ = [
    "METRICS",
    "OCR_BACKENDS",
    "OCR_METRICS",
    "ImagePair",
    "ImageText",
    "MetricSpec",
    "MetricUnavailableError",
    "OcrBackend",
    "OcrUnavailableError",
    "PaddleOcrBackend",
    "PairedSet",
    "TesseractBackend",
    "TextNormalization",
    "TextTruth",
    "WordBox",
    "character_error_rate",
    "create_backend",
    "edit_distance",
    "image_seed",
    "load_metric",
    "make_synthetic_set",
    "make_text_set",
    "markdown_table",
    "method_means",
    "normalized_edit_distance",
    "pair_folders",
    "psnr",
    "read_csv",
    "read_tensor",
    "read_text_truth",
    "rgb_to_y",
    "score_text",
    "ssim",
    "write_csv",
]

if TYPE_CHECKING:
    from .datasets import ImagePair, PairedSet, image_seed, make_synthetic_set, pair_folders, read_tensor
    from .metric_specs import METRICS, OCR_METRICS, MetricSpec, MetricUnavailableError
    from .metrics import load_metric, psnr, rgb_to_y, ssim
    from .ocr import score_text
    from .ocr_backends import (
        OCR_BACKENDS,
        OcrBackend,
        OcrUnavailableError,
        PaddleOcrBackend,
        TesseractBackend,
        create_backend,
    )
    from .ocr_truth import ImageText, TextTruth, WordBox, read_text_truth
    from .report import markdown_table, method_means, read_csv, write_csv
    from .text_metrics import TextNormalization, character_error_rate, edit_distance, normalized_edit_distance
    from .text_sets import make_text_set


def __getattr__(name: str) -> Any:
    return lazy_export(__name__, _exports, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_exports})
