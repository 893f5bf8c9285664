"""The metrics the harness knows, described without loading them, so that ``faithdiff-eval --help`` can list them
without importing torch. Computing them is :mod:`.metrics`' job."""

from __future__ import annotations

from dataclasses import dataclass

EVAL_EXTRA = 'pip install "faithdiff-pipeline[eval]"'


class MetricUnavailableError(RuntimeError):
    """A metric needs pyiqa (or its weights), and it is not there."""


# What a metric can compare the restored image with: the HQ image, the LQ input, or nothing.
REFERENCES = ("hq", "lq", None)


@dataclass(frozen=True)
class MetricSpec:
    """What the harness needs to know about a metric before loading it.

    Attributes:
        name: The name used on the command line and in reports.
        higher_is_better: Direction of the arrow in the table.
        reference: What it compares the restored image with: ``"hq"`` (the ground truth), ``"lq"`` (the low-quality
            input, the restored image first reduced to its size: see :mod:`faithdiff_pipeline.fidelity`) or ``None``
            (it scores the restored image alone).
        pyiqa_name: The pyiqa metric it is computed with, or ``None`` for the ones written here.
        label: The column title in the table.
        decimals: Decimals shown in the table (2 for scores in dB or on a 0-100 scale, 4 for those in [0, 1]).
    """

    name: str
    higher_is_better: bool
    reference: str | None
    pyiqa_name: str | None
    label: str
    decimals: int = 4

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"`reference` must be one of {REFERENCES}, got {self.reference!r}.")

    @property
    def full_reference(self) -> bool:
        """Whether it compares with the HQ image."""
        return self.reference == "hq"


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("psnr", True, "hq", None, "PSNR", 2),
        MetricSpec("ssim", True, "hq", None, "SSIM"),
        MetricSpec("psnr-y", True, "hq", None, "PSNR-Y", 2),
        MetricSpec("ssim-y", True, "hq", None, "SSIM-Y"),
        # Consistency with the input: the restored image reduced to the LQ size, against the LQ image.
        MetricSpec("lr-psnr", True, "lq", None, "LR-PSNR", 2),
        MetricSpec("lr-ssim", True, "lq", None, "LR-SSIM"),
        MetricSpec("lpips", False, "hq", "lpips", "LPIPS"),
        MetricSpec("dists", False, "hq", "dists", "DISTS"),
        MetricSpec("musiq", True, None, "musiq", "MUSIQ", 2),
        MetricSpec("maniqa", True, None, "maniqa", "MANIQA"),
        MetricSpec("clipiqa+", True, None, "clipiqa+", "CLIPIQA+"),
        MetricSpec("niqe", False, None, "niqe", "NIQE", 2),
    )
}
# The scores of `faithdiff-eval --ocr` (text_metrics.py). They are not image metrics (`--metrics` does not take them),
# but columns of the same table and CSV.
OCR_METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("word-acc", True, "hq", None, "Word acc"),
        MetricSpec("cer", False, "hq", None, "CER"),
        MetricSpec("ned", False, "hq", None, "NED"),
    )
}
# Every column a report can have.
REPORT_COLUMNS: dict[str, MetricSpec] = {**METRICS, **OCR_METRICS}
BUILTIN_METRICS = tuple(name for name, spec in METRICS.items() if spec.pyiqa_name is None)
PYIQA_METRICS = tuple(name for name, spec in METRICS.items() if spec.pyiqa_name is not None)
