"""The metrics the harness knows, described without loading them, so that ``faithdiff-eval --help`` can list them
without importing torch. Computing them is :mod:`.metrics`' job."""

from __future__ import annotations

from dataclasses import dataclass

EVAL_EXTRA = 'pip install "faithdiff-pipeline[eval]"'


class MetricUnavailableError(RuntimeError):
    """A metric needs pyiqa (or its weights), and it is not there."""


@dataclass(frozen=True)
class MetricSpec:
    """What the harness needs to know about a metric before loading it.

    Attributes:
        name: The name used on the command line and in reports.
        higher_is_better: Direction of the arrow in the table.
        full_reference: Whether it compares with the HQ image (otherwise it scores the restored image alone).
        pyiqa_name: The pyiqa metric it is computed with, or ``None`` for the ones written here.
        label: The column title in the table.
        decimals: Decimals shown in the table (2 for scores in dB or on a 0-100 scale, 4 for those in [0, 1]).
    """

    name: str
    higher_is_better: bool
    full_reference: bool
    pyiqa_name: str | None
    label: str
    decimals: int = 4


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("psnr", True, True, None, "PSNR", 2),
        MetricSpec("ssim", True, True, None, "SSIM"),
        MetricSpec("psnr-y", True, True, None, "PSNR-Y", 2),
        MetricSpec("ssim-y", True, True, None, "SSIM-Y"),
        MetricSpec("lpips", False, True, "lpips", "LPIPS"),
        MetricSpec("dists", False, True, "dists", "DISTS"),
        MetricSpec("musiq", True, False, "musiq", "MUSIQ", 2),
        MetricSpec("maniqa", True, False, "maniqa", "MANIQA"),
        MetricSpec("clipiqa+", True, False, "clipiqa+", "CLIPIQA+"),
        MetricSpec("niqe", False, False, "niqe", "NIQE", 2),
    )
}
# The scores of `faithdiff-eval --ocr` (text_metrics.py). They are not image metrics (`--metrics` does not take them),
# but columns of the same table and CSV.
OCR_METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("word-acc", True, True, None, "Word acc"),
        MetricSpec("cer", False, True, None, "CER"),
        MetricSpec("ned", False, True, None, "NED"),
    )
}
# Every column a report can have.
REPORT_COLUMNS: dict[str, MetricSpec] = {**METRICS, **OCR_METRICS}
BUILTIN_METRICS = tuple(name for name, spec in METRICS.items() if spec.pyiqa_name is None)
PYIQA_METRICS = tuple(name for name, spec in METRICS.items() if spec.pyiqa_name is not None)
