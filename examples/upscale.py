"""Restore and upscale one photo with the released FaithDiff weights.

The first run converts the official release (jychen9811/FaithDiff + SG161222/RealVisXL_V4.0 +
madebyollin/sdxl-vae-fp16-fix) into a local cache ($FAITHDIFF_CACHE or ~/.cache/faithdiff-pipeline); later runs load it.

    python examples/upscale.py photo.jpg -o restored.png --prompt "An old portrait of a man in a uniform."
"""

from __future__ import annotations

import argparse
from pathlib import Path

import PIL.Image
import torch

from faithdiff_pipeline import FaithDiffSDXLPipeline, converted_release


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, help="low-quality input image")
    parser.add_argument("-o", "--output", type=Path, help="output path (default: INPUT_faithdiff.png)")
    parser.add_argument("--model", help="converted pipeline folder or Hub id (default: the official release, converted)")
    parser.add_argument("--prompt", default="", help="description of the image (FaithDiff works best with one)")
    parser.add_argument("--upscale", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--offload", action="store_true", help="model CPU offload (less GPU memory)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dtype = torch.float32 if device == "cpu" else torch.float16
    variant = "fp16" if dtype == torch.float16 else None
    model = args.model or converted_release(variant=variant)
    pipe = FaithDiffSDXLPipeline.from_pretrained(model, dtype=dtype, variant=variant if args.model is None else None)
    if args.offload and device != "cpu":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    result = pipe(
        PIL.Image.open(args.image),
        prompt=args.prompt,
        upscale=args.upscale,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(args.seed),
    ).images[0]
    output = args.output or args.image.with_name(f"{args.image.stem}_faithdiff.png")
    result.save(output)
    print(f"Saved {output} ({result.width}x{result.height})")


if __name__ == "__main__":
    main()
