"""The official test script's sampling settings, which are the defaults of the pipeline and of every command, and the
choices the pipeline offers for each. Written once here, imported by the pipeline's signature, the option table of
the commands and the evaluation, so that none of them can drift from the release. Imports nothing heavy."""

from __future__ import annotations

UPSCALE = 2.0
NUM_INFERENCE_STEPS = 20
GUIDANCE_SCALE = 5.0
# Denoising starts from the noised LQ latent ("lr") as in the release's test script, or from pure noise.
START_POINTS = ("lr", "noise")
START_POINT = "lr"
# Latent tiles of 1024 px (128 latents) with the release's half-tile stride; four tiles per UNet call is ours.
TILE_SIZE = 1024
TILE_BATCH_SIZE = 4
COLOR_FIXES = ("adain", "wavelet")
COLOR_FIX = "adain"
# The largest result accepted, width times height: 8192x8192.
MAX_OUTPUT_PIXELS = 8192 * 8192
