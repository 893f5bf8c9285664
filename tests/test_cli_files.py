"""faithdiff-upscale with real files: what comes out is faithful to the user's photo, and the user's files are never
overwritten, confused or lost."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
from PIL import ImageCms

from shared_data import shared_path
from faithdiff_pipeline.cli import main
from faithdiff_pipeline.image_io import read_image, result_text

FAST = ["--steps", "2", "--tile-size", "64", "--device", "cpu", "--dtype", "float32", "--prompt", "a photo"]


def _cli(model, *args) -> int:
    return main([*args, "--model", str(model), *FAST])


def _photo(size=(24, 16)) -> PIL.Image.Image:
    with PIL.Image.open(shared_path("samples", "chelsea.png")) as photo:
        return photo.convert("RGB").resize(size, PIL.Image.BICUBIC)


def _hashes(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_phone_photo_comes_out_upright(tiny_model_dir, tmp_path) -> None:
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored turned: shown rotated 90 degrees clockwise
    _photo((24, 16)).save(tmp_path / "phone.jpg", exif=exif, quality=98)
    with PIL.Image.open(tmp_path / "phone.jpg") as stored:
        # The same decoded pixels, turned upright by Pillow and stored without orientation.
        PIL.ImageOps.exif_transpose(stored).save(tmp_path / "upright.png")
    inputs = [str(tmp_path / "phone.jpg"), str(tmp_path / "upright.png")]
    assert _cli(tiny_model_dir, *inputs, "-o", str(tmp_path / "out"), "--compare") == 0
    with (
        PIL.Image.open(tmp_path / "out" / "phone.png") as phone,
        PIL.Image.open(tmp_path / "out" / "upright.png") as ref,
    ):
        assert phone.size == (32, 48)  # portrait, as the phone shows it
        assert phone.getexif().get(0x0112, 1) == 1
        assert np.array_equal(np.asarray(phone), np.asarray(ref))
    with PIL.Image.open(tmp_path / "out" / "phone_compare.png") as compare:
        left = np.asarray(compare.convert("RGB"))[:, :32]
    with PIL.Image.open(tmp_path / "upright.png") as upright:
        assert np.array_equal(left, np.asarray(upright.resize((32, 48), PIL.Image.LANCZOS)))


@pytest.mark.parametrize("name", ["scan.png", "scan.tif"])
def test_16_bit_greyscale_scan_gives_a_16_bit_greyscale_result_at_its_level(tiny_model_dir, tmp_path, name) -> None:
    rng = np.random.default_rng(0)
    scan = (32768 + 6000 * rng.standard_normal((16, 24))).clip(0, 65535).astype(np.uint16)
    PIL.Image.fromarray(scan).save(tmp_path / name)
    assert _cli(tiny_model_dir, str(tmp_path / name), "-o", str(tmp_path / "out")) == 0
    with PIL.Image.open(tmp_path / "out" / "scan.png") as result:
        assert result.mode == "I;16" and result.size == (48, 32)
        levels = np.asarray(result).astype(np.float64)
    assert abs(levels.mean() - scan.mean()) < 257  # AdaIN matches the input's level (8-bit was washed out)
    assert np.any(levels % 257 != 0)  # not 8-bit values stretched to 16 bits


def test_16_bit_colour_tiff_gives_16_bit_tiff(tiny_model_dir, tmp_path) -> None:
    import tifffile

    samples = (np.asarray(_photo(), dtype=np.float64) * 257).astype(np.uint16)
    tifffile.imwrite(tmp_path / "film.tif", samples, photometric="rgb")
    assert _cli(tiny_model_dir, str(tmp_path / "film.tif"), "-o", str(tmp_path / "out"), "--format", "tiff") == 0
    result = read_image(tmp_path / "out" / "film.tif")
    assert result.bit_depth == 16 and result.size == (48, 32) and not result.greyscale
    assert result_text(tmp_path / "out" / "film.tif")["caption"] == "a photo"


def test_adobe_rgb_photo_keeps_its_colours(tiny_model_dir, tmp_path) -> None:
    with PIL.Image.open(shared_path("samples", "rocket.jpg")) as rocket:
        profile = rocket.info["icc_profile"]
        small = rocket.resize((24, 16), PIL.Image.LANCZOS)
    small.save(tmp_path / "rocket.jpg", icc_profile=profile, quality=98)
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    srgb = ImageCms.createProfile("sRGB")
    expected = np.asarray(ImageCms.profileToProfile(small, source, srgb), dtype=np.float64).mean((0, 1))
    for choice in ("srgb", "source"):
        out = tmp_path / choice
        assert _cli(tiny_model_dir, str(tmp_path / "rocket.jpg"), "-o", str(out), "--profile", choice) == 0
        with PIL.Image.open(out / "rocket.png") as result:
            embedded = result.info["icc_profile"]
            if choice == "source":
                assert embedded == profile
            as_srgb = ImageCms.profileToProfile(result, ImageCms.ImageCmsProfile(io.BytesIO(embedded)), srgb)
        # AdaIN against the sRGB-converted input: the channel means are the input's, seen in sRGB.
        assert np.abs(np.asarray(as_srgb, dtype=np.float64).mean((0, 1)) - expected).max() < 2


def test_rgba_keeps_its_alpha_and_ignores_hidden_colour(tiny_model_dir, tmp_path) -> None:
    photo = np.asarray(_photo(), dtype=np.uint8)
    alpha = np.full((16, 24), 255, np.uint8)
    alpha[4:12, 6:18] = 0
    for name, hidden in (("magenta", (255, 0, 255)), ("black", (0, 0, 0))):
        rgba = np.dstack([photo, alpha])
        rgba[alpha == 0, :3] = hidden
        PIL.Image.fromarray(rgba, "RGBA").save(tmp_path / f"{name}.png")
    assert (
        _cli(tiny_model_dir, str(tmp_path / "magenta.png"), str(tmp_path / "black.png"), "-o", str(tmp_path / "out"))
        == 0
    )
    with PIL.Image.open(tmp_path / "out" / "magenta.png") as a, PIL.Image.open(tmp_path / "out" / "black.png") as b:
        assert a.mode == "RGBA" and a.size == (48, 32)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        expected = np.asarray(PIL.Image.fromarray(alpha).resize((48, 32), PIL.Image.LANCZOS))
        assert np.array_equal(np.asarray(a)[..., 3], expected)


def test_formats_and_dpi(tiny_model_dir, tmp_path) -> None:
    _photo().save(tmp_path / "print.png", dpi=(300, 300))
    for fmt, suffix in (("jpeg", ".jpg"), ("webp", ".webp"), ("tiff", ".tif")):
        assert _cli(tiny_model_dir, str(tmp_path / "print.png"), "-o", str(tmp_path / fmt), "--format", fmt) == 0
        with PIL.Image.open(tmp_path / fmt / f"print{suffix}") as result:
            assert result.format == fmt.upper() and result.size == (48, 32)
            if fmt != "webp":
                assert result.info["dpi"] == pytest.approx((600, 600), abs=0.5)
        # A rerun knows its own results in every format.
        assert _cli(tiny_model_dir, str(tmp_path / "print.png"), "-o", str(tmp_path / fmt), "--format", fmt) == 0


def test_results_get_the_umask_mode(tiny_model_dir, tmp_path) -> None:
    _photo().save(tmp_path / "a.png")
    previous = os.umask(0o022)
    try:
        assert _cli(tiny_model_dir, str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--compare") == 0
    finally:
        os.umask(previous)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {0o644}


def _expect_usage_error(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("faithdiff-upscale: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_output_into_the_input_folder_never_replaces_an_input(tiny_model_dir, tmp_path, capsys, overwrite) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        _photo().rotate(90 * i).save(photos / f"p{i}.png")
    before = _hashes(photos)
    assert _cli(tiny_model_dir, str(photos), "-o", str(photos), *overwrite) == 2
    _expect_usage_error(capsys, "results would replace input files")
    assert _hashes(photos) == before


def test_a_foreign_file_in_a_results_place_is_a_clash_not_a_skip(tiny_model_dir, tmp_path, capsys) -> None:
    _photo().save(tmp_path / "a.png")
    (tmp_path / "out").mkdir()
    _photo().rotate(180).save(tmp_path / "out" / "a.png")  # the user's own file, not a result
    before = _hashes(tmp_path / "out")
    for extra in ([], ["--overwrite"]):
        assert _cli(tiny_model_dir, str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), *extra) == 2
        _expect_usage_error(capsys, "not faithdiff results are in the way")
    assert _hashes(tmp_path / "out") == before


@pytest.mark.parametrize(
    "names, extra, message",
    [
        (["a.png", "a.jpg"], [], "would both be written as a.png"),
        (["a.png", "a_compare.png"], ["--compare"], "would both be written as a_compare.png"),
    ],
)
def test_result_clashes_are_found_before_any_work(tiny_model_dir, tmp_path, capsys, names, extra, message) -> None:
    for name in names:
        _photo().save(tmp_path / name)
    assert _cli(tiny_model_dir, *[str(tmp_path / n) for n in names], "-o", str(tmp_path / "out"), *extra) == 2
    _expect_usage_error(capsys, message)
    assert not (tmp_path / "out").exists()


def test_existing_names_with_glob_characters_are_literal(tiny_model_dir, tmp_path) -> None:
    _photo().save(tmp_path / "scan [1].png")
    assert _cli(tiny_model_dir, str(tmp_path / "scan [1].png"), "-o", str(tmp_path / "out")) == 0
    assert (tmp_path / "out" / "scan [1].png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--upscale", "nan"], "--upscale must be a finite number"),
        (["--guidance", "inf"], "--guidance must be a finite number"),
        (["--tile-size", "100"], "--tile-size must be a multiple of 8"),
        (["--tile-size", "128", "--tile-stride", "200"], "--tile-stride must be a multiple of 8 between 8 and"),
        (["-o", "blocker/out"], "cannot be created: "),
        (["--format", "jpeg", "--bit-depth", "16"], "--bit-depth 16 needs format 'png' or 'tiff'"),
        (["--quality", "0"], "--quality must be an integer from 1 to 100"),
    ],
)
def test_mistakes_are_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    _photo().save(tmp_path / "a.png")
    (tmp_path / "blocker").write_text("a file")
    # A folder that passes the settings' check but holds no model: reaching the loader would be a different error.
    (tmp_path / "no-model").mkdir()
    (tmp_path / "no-model" / "model_index.json").write_text("{}")
    assert main(["a.png", "--model", str(tmp_path / "no-model"), *args]) == 2
    _expect_usage_error(capsys, message)


def test_a_too_large_result_is_refused_without_allocating(tiny_model_dir, tmp_path, capsys) -> None:
    _photo((512, 340)).save(tmp_path / "big.png")
    assert _cli(tiny_model_dir, str(tmp_path / "big.png"), "-o", str(tmp_path / "out"), "--upscale", "1000") == 1
    out = capsys.readouterr().out
    assert "more than `max_output_pixels`" in out and "1 failed" in out


def test_ctrl_c_while_loading_exits_130_without_traceback(tiny_model_dir, tmp_path, monkeypatch, capsys) -> None:
    import faithdiff_pipeline.loading as loading

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "load_pipeline", interrupted)
    _photo().save(tmp_path / "a.png")
    assert _cli(tiny_model_dir, str(tmp_path / "a.png"), "-o", str(tmp_path / "out")) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_a_failed_load_leaves_no_output_folder(tmp_path, capsys) -> None:
    _photo().save(tmp_path / "a.png")
    assert main([str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_hub_unreachable_fails_fast_with_the_local_folder_hint(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FAITHDIFF_CACHE", str(tmp_path / "cache"))
    _photo().save(tmp_path / "a.png")
    assert main([str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("faithdiff-upscale: error: could not load the pipeline: The Hugging Face Hub could not")
    assert "--model FOLDER" in err
    assert not (tmp_path / "out").exists()
