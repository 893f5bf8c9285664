"""Fidelity to the input: consistency (LR-PSNR/LR-SSIM, error map), added detail, seed spread, the map files, and the
LR columns of faithdiff-eval."""

from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from shared_data import shared_path
from skimage.metrics import peak_signal_noise_ratio
from tiny_models import structured_photo

from faithdiff_pipeline import FidelityReport, measure_fidelity, restore_with_seeds
from faithdiff_pipeline.evaluation.metrics import load_metric, score_result
from faithdiff_pipeline.evaluation.report import markdown_table, read_csv, write_csv
from faithdiff_pipeline.fidelity import (
    fidelity_map_paths,
    save_fidelity_maps,
    save_heat_map,
    save_raw_map,
    seed_spread,
)
from faithdiff_pipeline.image_io import read_image, result_text

SAMPLES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
PATCH = 128


def _pil_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL's LANCZOS on each channel in 32-bit float mode, clipped: the documented filter, called directly."""
    height, width = size
    channels = [
        np.asarray(PIL.Image.fromarray(image[..., c].astype(np.float32)).resize((width, height), PIL.Image.LANCZOS))
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def _photo(name: str | None) -> np.ndarray:
    """A sample photo (float RGB), or a synthetic one for ``None``."""
    if name is None:
        return np.asarray(structured_photo(320, 288, seed=3), dtype=np.float32) / 255.0
    return read_image(shared_path("samples") / name).as_float()


def _input_and_upscale(photo: np.ndarray, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """The photo reduced by ``scale`` (the low-quality input) and that input's LANCZOS upscale to the photo's size."""
    height, width = photo.shape[:2]
    low = _pil_resize(photo, (round(height / scale), round(width / scale)))
    return low, _pil_resize(low, (height, width))


# ---------------------------------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("name", [None, *SAMPLES], ids=["synthetic", *SAMPLES])
def test_a_pasted_texture_lowers_consistency_and_the_detail_map_finds_it(name) -> None:
    """A square of random texture pasted into the LANCZOS upscale is found by the added-detail map.

    Overlap is the IoU of the thresholded map (``> detail_threshold``, the pixels counted in ``added_detail_share``)
    with the square. The texture has fine detail everywhere in the square, so the map should cover all of it; but it
    is averaged over a window (sigma 0.75 input pixel) and the square's seam is itself detail the input lacks, so the
    map runs 2-3 pixels past each edge: about 0.9 for a perfect map on a 128-pixel square. 0.8 fails a map that
    misses a fifth of the square or spills well outside it. The share of the map's mass inside the square is checked
    the same way, without the threshold.
    """
    photo = _photo(name)
    low, upscaled = _input_and_upscale(photo)
    height, width = upscaled.shape[:2]
    top, left = height // 3, width // 3
    pasted = upscaled.copy()
    pasted[top : top + PATCH, left : left + PATCH] = np.random.default_rng(0).random((PATCH, PATCH, 3))
    mask = np.zeros((height, width), bool)
    mask[top : top + PATCH, left : left + PATCH] = True

    plain, with_patch = measure_fidelity(upscaled, low), measure_fidelity(pasted, low)
    assert plain.lr_psnr > with_patch.lr_psnr + 10 and plain.lr_ssim > with_patch.lr_ssim
    assert plain.added_detail_share == 0.0 and not plain.added_detail_map.any()
    # The error map, at the input's size, is high where the square is and nowhere else.
    low_mask = np.zeros(low.shape[:2], bool)
    low_mask[top // 2 + 2 : (top + PATCH) // 2 - 2, left // 2 + 2 : (left + PATCH) // 2 - 2] = True
    error = with_patch.consistency_map
    assert error.shape == low.shape[:2] and with_patch.consistency_map_upsampled.shape == (height, width)
    assert error[low_mask].mean() > 10 * error[~low_mask].mean()

    detail = with_patch.added_detail_map
    assert detail.shape == (height, width) and detail.dtype == np.float32 and 0 <= detail.min() <= detail.max() <= 1
    found = detail > with_patch.detail_threshold
    assert (found & mask).sum() / (found | mask).sum() >= 0.8
    assert detail[mask].sum() / detail.sum() >= 0.8
    assert with_patch.added_detail_share == pytest.approx(found.mean())


@pytest.mark.parametrize("scale", [2.0, 2.5])
def test_detail_above_the_input_nyquist_limit_is_consistent_and_a_colour_shift_is_not(scale) -> None:
    """Noise with no frequency below 0.3 cycles per result pixel (the input's Nyquist limit is 0.5 / scale: 0.25 and
    0.2) changes the result by 30 dB PSNR yet leaves the reduced result as it was; it is added detail. A colour shift
    of 0.03 is a far smaller change per pixel but visible at any resolution."""
    photo = 0.25 + 0.5 * _photo(None)  # room for the noise, and for LANCZOS overshoot, without clipping
    low, upscaled = _input_and_upscale(photo, scale)
    height, width = upscaled.shape[:2]
    noise = np.random.default_rng(1).standard_normal((height, width, 3))
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :]
    fine = ((np.abs(fy) > 0.3) | (np.abs(fx) > 0.3))[..., None]
    noise = np.real(np.fft.ifft2(np.fft.fft2(noise, axes=(0, 1)) * fine, axes=(0, 1)))
    detailed = (upscaled + 0.03 * noise / noise.std()).astype(np.float32)
    assert detailed.min() >= 0 and detailed.max() <= 1
    assert 10 * math.log10(1 / np.mean((detailed - upscaled) ** 2)) < 31

    plain, fine_detail = measure_fidelity(upscaled, low), measure_fidelity(detailed, low)
    assert fine_detail.lr_psnr > 40 and fine_detail.lr_psnr > plain.lr_psnr - 0.5
    assert fine_detail.lr_ssim > 0.99 and fine_detail.lr_ssim > plain.lr_ssim - 0.005
    assert fine_detail.added_detail_share > 0.5

    shifted = measure_fidelity(np.clip(upscaled + np.array([0.03, 0.0, -0.03], np.float32), 0, 1), low)
    assert shifted.lr_psnr < plain.lr_psnr - 8 and shifted.lr_ssim < plain.lr_ssim
    assert shifted.added_detail_share == 0.0


@pytest.mark.parametrize("name", [None, *SAMPLES], ids=["synthetic", *SAMPLES])
def test_lr_psnr_and_the_error_map_agree_with_an_independent_computation(name) -> None:
    """The result reduced with PIL's LANCZOS filter (called here directly), then scikit-image's PSNR. The sizes are
    not multiples of the scale for most photos (chelsea.png: 451 x 300 from 180 x 120)."""
    photo = _photo(name)
    low, _ = _input_and_upscale(photo, 2.5)
    # Any result of the right size: the photo itself, with some noise so that the reduction is no identity.
    result = np.clip(photo + np.random.default_rng(2).normal(0, 0.05, photo.shape), 0, 1).astype(np.float32)
    report = measure_fidelity(result, low)
    reduced = _pil_resize(result, low.shape[:2])
    assert report.lr_psnr == pytest.approx(peak_signal_noise_ratio(low, reduced, data_range=1), abs=1e-4)
    np.testing.assert_allclose(report.consistency_map, np.abs(reduced - low).mean(axis=-1), atol=1e-6)


def test_an_identical_reduction_and_the_metadata() -> None:
    """A result whose reduction is the input gives an infinite LR-PSNR, stored as "inf" in JSON-able metadata."""
    low = _pil_resize(_photo(None), (144, 160))
    report = measure_fidelity(low, low)  # scale 1: the reduction is the identity
    assert report.lr_psnr == math.inf and report.lr_ssim == 1.0
    metadata = json.loads(json.dumps(report.as_metadata(), allow_nan=False))
    assert metadata["lr_psnr"] == "inf" and float(metadata["lr_psnr"]) == math.inf
    assert set(metadata) == {"lr_psnr", "lr_ssim", "added_detail_share", "detail_threshold", "downscale_filter"}
    assert isinstance(report, FidelityReport)
    with pytest.raises(AttributeError):
        report.lr_psnr = 0.0  # frozen


@pytest.mark.parametrize(
    ("result", "low", "kwargs", "error", "message"),
    [
        ("list", (20, 20), {}, TypeError, r"`result` must be a float \[H, W, 3\] array in \[0, 1\] or a PIL image"),
        ((40, 40, 4), (20, 20), {}, ValueError, r"`result` must be a float \[H, W, 3\] array"),
        ((40, 40), (20, 20), {"bad_range": True}, ValueError, r"`result` has float values from"),
        ((40, 60), (20, 20), {}, ValueError, r"`result` is 60x40 pixels; expected `low_quality` \(20x20\)"),
        ((10, 10), (20, 20), {}, ValueError, r"`result` is 10x10 pixels"),
        ((20, 20), (10, 10), {}, ValueError, r"`low_quality` is 10x10 pixels; LR-SSIM needs at least 11x11"),
        ((40, 40), (20, 20), {"detail_threshold": 1.5}, ValueError, r"`detail_threshold` must be a number in \(0, 1\)"),
        ((40, 40), (20, 20), {"seeds_results": []}, ValueError, r"at least 2 restorations to spread, got 0"),
        ((40, 40), (20, 20), {"seeds_results": "ab"}, TypeError, r"`seeds_results` must be a list"),
        ((40, 40), (20, 20), {"seeds_pair": (40, 41)}, ValueError, r"`seeds_results\[1\]` has shape \(40, 41, 3\)"),
    ],
)
def test_mistakes_name_the_argument_and_what_was_expected(result, low, kwargs, error, message) -> None:
    rng = np.random.default_rng(0)
    kwargs = dict(kwargs)
    if result == "list":
        result = [[0.0]]
    else:
        result = rng.random((*result, 3) if len(result) == 2 else result).astype(np.float32)
        if kwargs.pop("bad_range", False):
            result[0, 0, 0] = 1.5
    if "seeds_pair" in kwargs:
        other = kwargs.pop("seeds_pair")
        kwargs["seeds_results"] = [result, rng.random((*other, 3)).astype(np.float32)]
    with pytest.raises(error, match=message):
        measure_fidelity(result, rng.random((*low, 3)).astype(np.float32), **kwargs)


# ---------------------------------------------------------------------------------------------------- seed spread


def test_seed_spread_is_zero_for_one_seed_and_positive_across_seeds(tiny_pipe, lq_image) -> None:
    arguments = dict(prompt="a photo", num_inference_steps=2, tile_size=64)
    low = np.asarray(lq_image, dtype=np.float32) / 255.0

    def restore(seed: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(seed)
        return tiny_pipe(lq_image, generator=generator, output_type="np", **arguments).images[0]

    once, again = restore(0), restore(0)
    same = measure_fidelity(once, low, seeds_results=[once, again])
    assert same.spread_mean == 0.0 and not same.spread_map.any()

    restorations = restore_with_seeds(tiny_pipe, lq_image, [0, 1, 2], **arguments)
    assert len(restorations) == 3 and all(r.shape == once.shape and r.dtype == np.float32 for r in restorations)
    np.testing.assert_array_equal(restorations[0], once)  # the first seed's restoration is the plain call's
    spread = measure_fidelity(restorations[0], low, seeds_results=restorations)
    assert spread.spread_mean > 0.0 and (spread.spread_map > 0).mean() > 0.9
    np.testing.assert_allclose(spread.spread_map, np.std(np.stack(restorations), axis=0).mean(axis=-1), atol=1e-6)
    assert spread.as_metadata()["seed_count"] == 3 and spread.as_metadata()["spread_mean"] > 0


def test_restore_with_seeds_refuses_what_it_sets(tiny_pipe, lq_image) -> None:
    with pytest.raises(ValueError, match=r"`seeds` must be at least 2 distinct integers, got \[3, 3\]"):
        restore_with_seeds(tiny_pipe, lq_image, [3, 3])
    with pytest.raises(TypeError, match="`seeds` must be a sequence of integers"):
        restore_with_seeds(tiny_pipe, lq_image, 4)
    with pytest.raises(TypeError, match="`generator` is set by restore_with_seeds"):
        restore_with_seeds(tiny_pipe, lq_image, [0, 1], generator=torch.Generator())
    with pytest.raises(ValueError, match="at least 2 restorations"):
        seed_spread([np.zeros((4, 4, 3), np.float32)])


# ---------------------------------------------------------------------------------------------------- map files


def test_map_files_are_written_beside_the_result(tmp_path) -> None:
    low, upscaled = _input_and_upscale(_photo(None))
    pasted = upscaled.copy()
    pasted[40:104, 40:104] = np.random.default_rng(0).random((64, 64, 3))
    restorations = [pasted, np.clip(pasted + 0.01, 0, 1)]
    report = measure_fidelity(pasted, low, seeds_results=restorations)
    result_path = tmp_path / "photo.png"
    paths = save_fidelity_maps(report, pasted, result_path, raw=True, text={"parameters": "{}"})
    assert paths == fidelity_map_paths(result_path, spread=True, raw=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        f"photo_{name}{kind}.png" for name in ("consistency", "added_detail", "spread") for kind in ("", "_raw")
    )
    for name, values in report.maps().items():
        with PIL.Image.open(paths[name]) as heat:
            assert heat.mode == "RGB" and heat.size == (pasted.shape[1], pasted.shape[0])
        assert result_text(paths[name])["fidelity_map"] == name
        with PIL.Image.open(paths[f"{name}_raw"]) as raw:
            assert raw.mode.startswith("I;16") and raw.text["fidelity_map"] == name
            np.testing.assert_allclose(np.asarray(raw) / 65535.0, values, atol=0.5 / 65535 + 1e-7)
    # The heat map of the added detail is coloured inside the square and grey (channels equal) far from it.
    heat = np.asarray(PIL.Image.open(paths["added_detail"]), dtype=np.int16)
    assert np.ptp(heat[60:90, 60:90], axis=-1).mean() > 40
    assert np.ptp(heat[200:, 200:], axis=-1).max() <= 1
    assert not list(tmp_path.glob("*.faithdiff-tmp*"))


def test_raw_maps_refuse_other_formats_and_shapes(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"`target` .*must end in \.png"):
        save_raw_map(np.zeros((4, 4)), tmp_path / "map.tif")
    with pytest.raises(ValueError, match=r"`values` must be an \[H, W\] map"):
        save_raw_map(np.zeros((4, 4, 3)), tmp_path / "map.png")
    with pytest.raises(ValueError, match=r"`values` must be \[H, W\] = \(4, 4\)"):
        save_heat_map(np.zeros((4, 4, 3), np.float32), np.zeros((4, 5)), tmp_path / "heat.png")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- faithdiff eval


def test_lr_columns_in_an_evaluation_report(tmp_path) -> None:
    """LR-PSNR and LR-SSIM scored like the evaluation scores a pair (the HQ image, its LQ image, a LANCZOS result),
    in the CSV and the table beside PSNR and SSIM."""
    names = ["psnr", "ssim", "lr-psnr", "lr-ssim"]
    scorers = {name: load_metric(name) for name in names}
    rows = []
    for seed in (0, 1):
        hq = np.asarray(structured_photo(64, 48, seed=seed), dtype=np.float32) / 255.0
        lq = _pil_resize(hq, (24, 32))
        restored = _pil_resize(lq, (48, 64))
        batch = [torch.from_numpy(image).permute(2, 0, 1)[None] for image in (restored, hq, lq)]
        rows.append({"method": "lanczos", "image": f"image{seed}", **score_result(scorers, *batch)})
        expected = peak_signal_noise_ratio(lq, _pil_resize(restored, (24, 32)), data_range=1)
        assert rows[-1]["lr-psnr"] == pytest.approx(expected, abs=1e-4)
        assert rows[-1]["lr-psnr"] > rows[-1]["psnr"]
    write_csv(rows, names, tmp_path / "metrics.csv")
    assert read_csv(tmp_path / "metrics.csv") == rows
    assert "| Method | PSNR ↑ | SSIM ↑ | LR-PSNR ↑ | LR-SSIM ↑ |" in markdown_table(rows, names)
    with pytest.raises(ValueError, match="metric 'lr-psnr' compares with the LQ image; `lq` is None"):
        score_result(scorers, batch[0], batch[1], None)


def test_eval_cli_reports_lr_columns(tmp_path) -> None:
    from faithdiff_pipeline.evaluation.cli import main as eval_main

    hq, lq = tmp_path / "hq", tmp_path / "lq"
    hq.mkdir()
    lq.mkdir()
    for seed in (0, 1):
        photo = structured_photo(64, 48, seed=seed)
        photo.save(hq / f"image{seed}.png")
        photo.resize((32, 24), PIL.Image.BICUBIC).save(lq / f"image{seed}.png")
    out = tmp_path / "out"
    argv = ["--hq", str(hq), "--lq", str(lq), "--out", str(out), "--metrics", "psnr,ssim,lr-psnr,lr-ssim"]
    assert eval_main([*argv, "--device", "cpu"]) == 0
    assert "| Method | PSNR ↑ | SSIM ↑ | LR-PSNR ↑ | LR-SSIM ↑ |" in (out / "table.md").read_text()
    for row in read_csv(out / "metrics.csv"):
        low = np.asarray(PIL.Image.open(lq / f"{row['image']}.png"), dtype=np.float32) / 255.0
        restored = np.asarray(PIL.Image.open(out / "results" / "lanczos" / f"{row['image']}.png")) / 255.0
        expected = peak_signal_noise_ratio(low, _pil_resize(restored, (24, 32)), data_range=1)
        assert row["lr-psnr"] == pytest.approx(expected, abs=1e-4)
