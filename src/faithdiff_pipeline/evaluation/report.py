"""Reports of an evaluation run: per-image CSV, a paper-style Markdown table of means, a plot and a grid of crops."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

from ..atomic_files import atomic_path
from ..image_io import save_image
from .metric_specs import REPORT_COLUMNS

# One evaluated image: {"method": ..., "image": ..., <metric name>: float, ...}.
Row = dict
LABEL_HEIGHT = 18
NAME_WIDTH = 120
_BACKGROUND = (255, 255, 255)
_MISSING = (200, 200, 200)


def write_csv(rows: Sequence[Row], metric_names: Sequence[str], path: str | os.PathLike) -> Path:
    """One line per (method, image) with every metric, at full precision, written atomically."""
    path = Path(path)
    with atomic_path(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["method", "image", *metric_names])
        for row in rows:
            writer.writerow([row["method"], row["image"], *(repr(float(row[name])) for name in metric_names)])
    return path


def read_csv(path: str | os.PathLike) -> list[Row]:
    """The rows written by :func:`write_csv`, metrics as floats."""
    with open(path, newline="", encoding="utf-8") as stream:
        return [
            {key: value if key in ("method", "image") else float(value) for key, value in row.items()}
            for row in csv.DictReader(stream)
        ]


def method_means(rows: Sequence[Row], metric_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean of each metric per method (methods in order of appearance), with the image count under ``"images"``."""
    grouped: dict[str, list[Row]] = {}
    for row in rows:
        grouped.setdefault(row["method"], []).append(row)
    return {
        method: {
            "images": len(group),
            **{name: math.fsum(r[name] for r in group) / len(group) for name in metric_names},
        }
        for method, group in grouped.items()
    }


def column_label(name: str) -> str:
    """The table title of a metric with its direction: ``PSNR ↑``, ``LPIPS ↓``."""
    spec = REPORT_COLUMNS[name]
    return f"{spec.label} {'↑' if spec.higher_is_better else '↓'}"


def markdown_table(rows: Sequence[Row], metric_names: Sequence[str], caption: str = "") -> str:
    """The paper's layout: one row per method, one column per metric, means over the images; the best value of each
    column is in bold when several methods are compared. Methods with fewer images than the others (failures) show
    their count."""
    means = method_means(rows, metric_names)
    most = max((m["images"] for m in means.values()), default=0)
    best = {name: _best(means, name) for name in metric_names} if len(means) > 1 else {}
    lines = [f"{caption}\n" if caption else ""]
    lines.append("| Method | " + " | ".join(column_label(name) for name in metric_names) + " |")
    lines.append("| --- |" + " ---: |" * len(metric_names))
    for method, values in means.items():
        title = method if values["images"] == most else f"{method} ({values['images']} images)"
        cells = []
        for name in metric_names:
            text = f"{values[name]:.{REPORT_COLUMNS[name].decimals}f}"
            cells.append(f"**{text}**" if best.get(name) == method else text)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def _best(means: dict[str, dict[str, float]], name: str) -> str:
    pick = max if REPORT_COLUMNS[name].higher_is_better else min
    return pick(means, key=lambda method: means[method][name])


def plot_metrics(rows: Sequence[Row], metric_names: Sequence[str], path: str | os.PathLike) -> Path:
    """A PNG with one panel per metric: the distribution of the per-image scores of each method (box and points).

    Uses matplotlib's Agg canvas directly, so it never touches pyplot's global backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(row["method"] for row in rows))
    columns = min(4, len(metric_names))
    lines = math.ceil(len(metric_names) / columns)
    figure = Figure(figsize=(3.2 * columns, 3.0 * lines), layout="constrained")
    FigureCanvasAgg(figure)
    for index, name in enumerate(metric_names):
        axes = figure.add_subplot(lines, columns, index + 1)
        values = [[row[name] for row in rows if row["method"] == method] for method in methods]
        axes.boxplot(values, showfliers=False)
        for position, scores in enumerate(values, start=1):
            # A fixed spread instead of random jitter keeps the plot identical between runs.
            spread = [position + 0.25 * (i / max(len(scores) - 1, 1) - 0.5) for i in range(len(scores))]
            axes.plot(spread, scores, "o", markersize=3, alpha=0.6)
        axes.set_xticks(range(1, len(methods) + 1), methods, rotation=30, ha="right")
        axes.set_title(column_label(name))
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    return path


def aligned_boxes(
    hq_size: tuple[int, int], scale: int, crop_size: int
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """The central square crop of an HQ image of ``hq_size`` (width, height) and the same region in its LQ image.

    The side is at most ``crop_size`` and, like the corner, a multiple of ``scale``, so both boxes cover exactly the
    same part of the scene.
    """
    width, height = hq_size
    side = max(scale, min(crop_size, width, height) // scale * scale)
    left = (width - side) // 2 // scale * scale
    top = (height - side) // 2 // scale * scale
    hq_box = (left, top, left + side, top + side)
    return hq_box, tuple(v // scale for v in hq_box)


def crop_tiles(
    hq: PIL.Image.Image,
    lq: PIL.Image.Image | None,
    results: Sequence[PIL.Image.Image | None],
    scale: int,
    crop_size: int,
) -> list[PIL.Image.Image | None]:
    """The crops of one grid row: the LQ region enlarged with nearest neighbours (so its pixels show), each result,
    and the HQ region. A missing image (unreadable, or a failed method), or a result whose size differs from the
    HQ image, gives ``None``."""
    hq_box, lq_box = aligned_boxes(hq.size, scale, crop_size)
    side = hq_box[2] - hq_box[0]
    lq_tile = lq.convert("RGB").crop(lq_box).resize((side, side), PIL.Image.NEAREST) if lq is not None else None
    tiles = [
        result.convert("RGB").crop(hq_box) if result is not None and result.size == hq.size else None
        for result in results
    ]
    return [lq_tile, *tiles, hq.convert("RGB").crop(hq_box)]


def crop_grid(
    grid_rows: Sequence[tuple[str, Sequence[PIL.Image.Image | None]]],
    column_labels: Sequence[str],
    path: str | os.PathLike,
    tile_size: int = 256,
) -> Path:
    """Writes a grid (atomically; PNG for a ``.png`` path): one row per image (its name on the left), one column per
    label, each crop shown at ``tile_size`` pixels with nearest-neighbour enlargement; missing crops are grey."""
    width = NAME_WIDTH + tile_size * len(column_labels)
    height = LABEL_HEIGHT + tile_size * len(grid_rows)
    canvas = PIL.Image.new("RGB", (width, height), _BACKGROUND)
    draw = PIL.ImageDraw.Draw(canvas)
    for column, label in enumerate(column_labels):
        draw.text((NAME_WIDTH + column * tile_size + 4, 3), label, fill=(0, 0, 0))
    for row, (name, tiles) in enumerate(grid_rows):
        top = LABEL_HEIGHT + row * tile_size
        draw.text((4, top + 4), name, fill=(0, 0, 0))
        for column, tile in enumerate(tiles):
            left = NAME_WIDTH + column * tile_size
            if tile is None:
                draw.rectangle((left, top, left + tile_size - 1, top + tile_size - 1), fill=_MISSING)
            else:
                canvas.paste(tile.resize((tile_size, tile_size), PIL.Image.NEAREST), (left, top))
    return save_image(canvas, path)
