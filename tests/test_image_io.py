"""image_io on real files made with Pillow and on ../shared/samples: orientation, bit depth, profiles, alpha,
metadata, formats, atomic writes."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from PIL import ImageCms, ImageOps

from shared_data import shared_path
from faithdiff_pipeline import image_io
from faithdiff_pipeline.atomic_files import TEMPORARY_SUFFIX, remove_leftovers
from faithdiff_pipeline.image_io import OutputOptions, read_image, result_text, save_result


def _photo(size=(48, 32)) -> PIL.Image.Image:
    with PIL.Image.open(shared_path("samples", "chelsea.png")) as photo:
        return photo.convert("RGB").resize(size, PIL.Image.BICUBIC)


def _to_srgb(image: PIL.Image.Image) -> np.ndarray:
    """An independent conversion of a tagged image to sRGB: Pillow's ImageCms straight on the file's profile."""
    profile = image.info.get("icc_profile")
    if not profile:
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    return np.asarray(converted, dtype=np.float64)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_and_reset(tmp_path, orientation) -> None:
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "PhoneMaker"
    path = tmp_path / "phone.jpg"
    _photo().save(path, exif=exif, quality=95)
    loaded = read_image(path)
    with PIL.Image.open(path) as opened:
        upright = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    assert np.array_equal(loaded.pixels, upright)
    assert image_io.image_size(path) == loaded.size
    kept = PIL.Image.Exif()
    kept.load(loaded.exif)
    assert kept.get(0x0112, 1) == 1 and kept[0x010F] == "PhoneMaker"


def test_16_bit_greyscale_png_and_tiff_keep_their_levels(tmp_path) -> None:
    ramp = np.linspace(1000, 64000, 40 * 30).reshape(30, 40).astype(np.uint16)
    for name in ("scan.png", "scan.tif"):
        PIL.Image.fromarray(ramp).save(tmp_path / name)
        loaded = read_image(tmp_path / name)
        assert loaded.bit_depth == 16 and loaded.greyscale
        assert np.array_equal(loaded.pixels[..., 1], ramp)
        out = save_result(
            loaded.as_float(), tmp_path / f"out-{name}", loaded, OutputOptions(format=name[-3:].replace("tif", "tiff"))
        )
        with PIL.Image.open(out) as written:
            assert written.mode == "I;16"
            assert np.array_equal(np.asarray(written), ramp)


def test_16_bit_colour_png_and_tiff_round_trip_with_profile_and_text(tmp_path) -> None:
    import imagecodecs
    import tifffile

    samples = (np.random.default_rng(0).random((20, 30, 3)) * 65535).astype(np.uint16)
    (tmp_path / "a.png").write_bytes(imagecodecs.png_encode(samples))
    tifffile.imwrite(tmp_path / "a.tif", samples, photometric="rgb")
    for name, fmt in (("a.png", "png"), ("a.tif", "tiff")):
        loaded = read_image(tmp_path / name)
        assert loaded.bit_depth == 16 and np.array_equal(loaded.pixels, samples)
        out = save_result(
            loaded.as_float(), tmp_path / f"out-{name}", loaded, OutputOptions(format=fmt), {"caption": "café"}
        )
        again = read_image(out)
        assert again.bit_depth == 16 and np.array_equal(again.pixels, samples)
        assert result_text(out)["caption"] == "café"
        with PIL.Image.open(out) as written:
            assert written.info["icc_profile"] == image_io.srgb_profile()


def test_adobe_rgb_is_converted_to_srgb_and_back(tmp_path) -> None:
    rocket = shared_path("samples", "rocket.jpg")
    loaded = read_image(rocket)
    with PIL.Image.open(rocket) as opened:
        expected = _to_srgb(opened)
        raw = np.asarray(opened, dtype=np.float64)
    assert np.abs(loaded.pixels - expected).max() <= 1
    assert np.abs(raw - expected).mean() > 3  # the profile matters: ignoring it shifts colours

    srgb_out = save_result(loaded.as_float(), tmp_path / "srgb.png", loaded)
    back = save_result(
        loaded.as_float(), tmp_path / "back.tif", loaded, OutputOptions(format="tiff", profile="source")
    )
    with PIL.Image.open(srgb_out) as a, PIL.Image.open(back) as b:
        assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(a.info["icc_profile"]))).startswith(
            "sRGB"
        )
        assert b.info["icc_profile"] == loaded.icc_profile
        assert np.abs(_to_srgb(a) - expected).max() <= 1
        assert np.abs(_to_srgb(b) - expected).mean() < 1.5
        assert np.abs(np.asarray(b, dtype=np.float64) - raw).mean() < 1.5


def test_16_bit_tagged_tiff_is_converted_without_8_bit_steps(tmp_path) -> None:
    import tifffile

    with PIL.Image.open(shared_path("samples", "rocket.jpg")) as opened:
        profile = opened.info["icc_profile"]
    ramp = np.linspace(0, 65535, 64 * 3, dtype=np.float64).reshape(1, 64, 3).repeat(4, axis=0).astype(np.uint16)
    tifffile.imwrite(tmp_path / "scan.tif", ramp, photometric="rgb", iccprofile=profile)
    loaded = read_image(tmp_path / "scan.tif")
    assert loaded.bit_depth == 16 and loaded.icc_profile == profile
    assert len(np.unique(loaded.pixels)) > 2 * 64  # 8-bit steps would leave at most 256 levels spread over 192


def test_cmyk_jpeg_becomes_rgb(tmp_path) -> None:
    photo = _photo()
    photo.convert("CMYK").save(tmp_path / "print.jpg", quality=95)
    loaded = read_image(tmp_path / "print.jpg")
    assert loaded.pixels.shape == (32, 48, 3)
    assert np.abs(loaded.pixels.astype(int) - np.asarray(photo, dtype=int)).mean() < 6


def test_alpha_is_kept_and_the_hidden_colour_is_not_content(tmp_path) -> None:
    photo = np.asarray(_photo(), dtype=np.uint8)
    alpha = np.full(photo.shape[:2], 255, np.uint8)
    alpha[8:24, 10:30] = 0
    alpha[:, :4] = 128
    hidden = []
    for colour in ((255, 0, 255), (0, 0, 0)):
        rgba = np.dstack([photo, alpha])
        rgba[alpha == 0, :3] = colour
        PIL.Image.fromarray(rgba, "RGBA").save(tmp_path / f"{colour[0]}.png")
        hidden.append(read_image(tmp_path / f"{colour[0]}.png"))
    assert np.array_equal(hidden[0].pixels, hidden[1].pixels)
    assert np.array_equal(hidden[0].pixels[alpha > 0], photo[alpha > 0])
    filled = hidden[0].pixels[alpha == 0].astype(int)
    assert filled.min() >= photo.min() and np.abs(filled.mean(0) - photo.mean((0, 1))).max() < 60
    upscaled = np.repeat(np.repeat(hidden[0].as_float(), 2, 0), 2, 1)
    out = save_result(upscaled, tmp_path / "out.png", hidden[0])
    with PIL.Image.open(out) as written:
        assert written.mode == "RGBA" and written.size == (96, 64)
        expected = PIL.Image.fromarray(alpha).resize((96, 64), PIL.Image.LANCZOS)
        assert np.abs(np.asarray(written)[..., 3].astype(int) - np.asarray(expected, dtype=int)).max() <= 1


def test_palette_transparency_and_grey_alpha(tmp_path) -> None:
    palette = _photo().quantize(16)
    palette.save(tmp_path / "icon.png", transparency=0)
    loaded = read_image(tmp_path / "icon.png")
    assert loaded.alpha is not None and (loaded.alpha == 0).any() and not loaded.greyscale
    grey = PIL.Image.merge("LA", [_photo().convert("L"), PIL.Image.new("L", (48, 32), 200)])
    grey.save(tmp_path / "la.png")
    loaded = read_image(tmp_path / "la.png")
    out = save_result(loaded.as_float(), tmp_path / "la-out.png", loaded)
    with PIL.Image.open(out) as written:
        assert written.mode == "LA" and np.asarray(written)[..., 1].min() == 200


def test_metadata_dpi_and_formats(tmp_path) -> None:
    exif = PIL.Image.Exif()
    exif[0x010F] = "ScannerCo"
    _photo().save(tmp_path / "scan.png", dpi=(300, 300), exif=exif)
    loaded = read_image(tmp_path / "scan.png")
    doubled = np.repeat(np.repeat(loaded.as_float(), 2, 0), 2, 1)
    for fmt in ("png", "tiff", "jpeg", "webp"):
        out = save_result(
            doubled, tmp_path / f"out{image_io.OUTPUT_FORMATS[fmt]}", loaded, OutputOptions(format=fmt), {"k": "v"}
        )
        with PIL.Image.open(out) as written:
            assert written.format == fmt.upper() and written.size == (96, 64)
            assert written.getexif()[0x010F] == "ScannerCo"
            if fmt != "webp":  # WebP stores no resolution
                assert written.info["dpi"] == pytest.approx((600, 600), abs=0.5)
        assert result_text(out) == {"Software": "faithdiff-pipeline", "k": "v"} if fmt == "png" else {"k": "v"}


def test_greyscale_result_is_the_luminance_unless_colour_is_kept(tmp_path) -> None:
    _photo().convert("L").save(tmp_path / "grey.png")
    loaded = read_image(tmp_path / "grey.png")
    colour = np.random.default_rng(1).random((32, 48, 3)).astype(np.float32)
    with PIL.Image.open(save_result(colour, tmp_path / "g.png", loaded)) as grey:
        luminance = colour @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
        assert grey.mode == "L" and np.abs(np.asarray(grey) - np.round(luminance * 255)).max() <= 1
    with PIL.Image.open(save_result(colour, tmp_path / "c.png", loaded, OutputOptions(keep_colour=True))) as kept:
        assert kept.mode == "RGB"


def test_bad_values_and_options_are_named() -> None:
    with pytest.raises(ValueError, match=r"float values from 255 to 255.*\[0, 1\]"):
        save_result(np.full((4, 4, 3), 255.0), "never.png")
    with pytest.raises(ValueError, match="`bit_depth` 16 needs format 'png' or 'tiff'"):
        OutputOptions(format="jpeg", bit_depth=16)
    with pytest.raises(ValueError, match="`quality` must be an integer from 1 to 100"):
        OutputOptions(quality=0)


def test_jpeg_refuses_alpha(tmp_path) -> None:
    PIL.Image.new("RGBA", (8, 8), (1, 2, 3, 100)).save(tmp_path / "a.png")
    loaded = read_image(tmp_path / "a.png")
    with pytest.raises(ValueError, match="JPEG cannot store the alpha channel"):
        save_result(loaded.as_float(), tmp_path / "a.jpg", loaded, OutputOptions(format="jpeg"))
    assert not list(tmp_path.glob("*.jpg")) and not list(tmp_path.glob(".*"))


def test_writes_get_the_umask_mode_and_leftovers_of_dead_writers_go(tmp_path) -> None:
    previous = os.umask(0o022)
    try:
        out = save_result(np.zeros((4, 4, 3), np.float32), tmp_path / "r.png")
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o644
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    stale = tmp_path / f".r.png.{socket.gethostname()}-{dead.stdout.strip()}.abcd1234{TEMPORARY_SUFFIX}"
    alive = tmp_path / f".r.png.{socket.gethostname()}-{os.getpid()}.abcd1234{TEMPORARY_SUFFIX}"
    users = tmp_path / ".r.png.mine.tmp"
    for path in (stale, alive, users):
        path.write_bytes(b"partial")
    assert remove_leftovers(tmp_path) == [stale]
    assert alive.exists() and users.exists() and out.exists()
