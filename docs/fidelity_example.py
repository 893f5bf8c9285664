"""Makes docs/fidelity_example.png: the fidelity maps of three stand-ins for a restoration of one sample photo.

No model weights are needed: a photo is reduced to half its size (the low-quality input), and three "results" are
made from that input by hand:

1. its LANCZOS upscale (what the pipeline starts from: consistent, no added detail);
2. the same with a patch of the original photo put back (detail the input lacks, yet consistent with it: the true
   detail, which consistency cannot tell from invented detail that happens to agree with the input);
3. the same with a patch of foreign texture pasted in (invented and inconsistent).

Each row shows the result, its consistency error and its added detail as heat maps over it, with the numbers.

    python docs/fidelity_example.py [--samples ../shared/samples] [--out docs/fidelity_example.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

from faithdiff_pipeline.fidelity import HEAT_FULL_SCALE, fidelity_heat_map, measure_fidelity
from faithdiff_pipeline.image_io import read_image, save_image
from faithdiff_pipeline.preprocessing import resize_float

HERE = Path(__file__).resolve().parent
# The region shown (in the result's pixels) and the patch inside it, on the astronaut's suit and the flag.
VIEW = (96, 160, 352, 416)  # left, top, right, bottom
PATCH = (176, 240, 272, 336)
TILE = 256
LABEL_HEIGHT = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=HERE.parents[1] / "shared" / "samples")
    parser.add_argument("--out", type=Path, default=HERE / "fidelity_example.png")
    args = parser.parse_args()

    photo = read_image(args.samples / "astronaut.png").as_float()
    height, width = photo.shape[:2]
    low_quality = resize_float(photo, (height // 2, width // 2))
    upscaled = resize_float(low_quality, (height, width))
    left, top, right, bottom = PATCH
    true_detail = upscaled.copy()
    true_detail[top:bottom, left:right] = photo[top:bottom, left:right]
    # Wood grain from another photo (the table's right edge), slightly reduced to fit the square.
    wood = read_image(args.samples / "coffee.png").as_float()[200:320, 480:600]
    foreign = upscaled.copy()
    foreign[top:bottom, left:right] = resize_float(wood, (bottom - top, right - left))

    rows = []
    for title, result in (
        ("LANCZOS upscale of the input", upscaled),
        ("with the photo's true detail in the square", true_detail),
        ("with foreign texture pasted in the square", foreign),
    ):
        report = measure_fidelity(result, low_quality)
        numbers = (
            f"LR-PSNR {report.lr_psnr:.1f} dB, LR-SSIM {report.lr_ssim:.3f}, "
            f"added detail {100 * report.added_detail_share:.1f} %"
        )
        tiles = [
            result,
            fidelity_heat_map(result, report.consistency_map_upsampled, HEAT_FULL_SCALE["consistency"]),
            fidelity_heat_map(result, report.added_detail_map, HEAT_FULL_SCALE["added_detail"]),
        ]
        rows.append((f"{title}: {numbers}", [_crop(tile) for tile in tiles]))

    columns = ["result", "consistency error (red: 0.1 or more)", "added detail (red: local RMS excess 0.05 or more)"]
    canvas = PIL.Image.new("RGB", (TILE * 3, LABEL_HEIGHT // 2 + len(rows) * (TILE + LABEL_HEIGHT)), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for column, label in enumerate(columns):
        draw.text((column * TILE + 4, 2), label, fill="black")
    for row, (label, tiles) in enumerate(rows):
        top = LABEL_HEIGHT // 2 + row * (TILE + LABEL_HEIGHT)
        draw.text((4, top + 4), label, fill="black")
        for column, tile in enumerate(tiles):
            canvas.paste(tile, (column * TILE, top + LABEL_HEIGHT - 10))
    # An adaptive palette keeps the PNG small; the heat maps' colours survive it.
    save_image(canvas.quantize(colors=128, method=PIL.Image.Quantize.MEDIANCUT), args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


def _crop(image: np.ndarray) -> PIL.Image.Image:
    left, top, right, bottom = VIEW
    tile = PIL.Image.fromarray((image[top:bottom, left:right] * 255).round().astype(np.uint8))
    outline = PIL.ImageDraw.Draw(tile)
    outline.rectangle((PATCH[0] - left - 1, PATCH[1] - top - 1, PATCH[2] - left, PATCH[3] - top), outline="white")
    return tile.resize((TILE, TILE), PIL.Image.NEAREST)


if __name__ == "__main__":
    main()
