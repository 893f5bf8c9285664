"""The application layer's contract, kept by faithdiff-upscale, faithdiff-explain and the Python entry point alike:
nothing we did not make is replaced, our outputs are never taken for inputs, inputs that give nothing are refused,
the Python route behaves as the command, a bad sidecar fails its image alone, and a photo is decoded once."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import PIL.Image
import pytest

from tiny_models import tiny_captioner
from faithdiff_pipeline import loading
from faithdiff_pipeline.application import captions as captions_module
from faithdiff_pipeline.application import photos as photos_module
from faithdiff_pipeline.application import restore_files
from faithdiff_pipeline.cli import main as upscale
from faithdiff_pipeline.explain import main as explain
from faithdiff_pipeline.image_io import result_text, save_result

FAST = ["--steps", "2", "--tile-size", "64", "--device", "cpu", "--dtype", "float32"]


def _photo(path, seed: int = 0) -> None:
    y, x = np.mgrid[0:16, 0:24]
    rgb = np.stack([(x * (9 + seed)) % 256, (y * 13 + 30 * seed) % 256, (x * y + seed) % 256], axis=-1)
    PIL.Image.fromarray(rgb.astype(np.uint8)).save(path)


def _hashes(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{command}: error: "), err
    return err[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fails a test that reaches the model loader."""
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))


# --------------------------------------------------------------------- 1. nothing replaced that we did not make


def test_explain_refuses_the_users_files_in_its_outputs_place(tmp_path, capsys, no_model) -> None:
    (tmp_path / "photos").mkdir()
    _photo(tmp_path / "photos" / "photo.jpg")
    (tmp_path / "out").mkdir()
    for name in ("photo.png", "photo_cat.png"):  # the user's own files
        _photo(tmp_path / "out" / name, seed=3)
    before = _hashes(tmp_path / "out")
    args = [str(tmp_path / "photos"), "--words", "cat", "--prompt", "a cat", "-o", str(tmp_path / "out"), *FAST]
    for extra in ([], ["--overwrite"]):
        assert explain([*args, *extra]) == 2
        assert "not faithdiff results are in the way" in _one_error_line(capsys, "faithdiff-explain")
    assert _hashes(tmp_path / "out") == before


def test_explain_outputs_are_ours_skipped_on_a_rerun_and_never_taken_for_upscale_results(
    tiny_model_dir, tmp_path, capsys
) -> None:
    (tmp_path / "photos").mkdir()
    _photo(tmp_path / "photos" / "photo.jpg")
    args = [str(tmp_path / "photos"), "--words", "cat", "--prompt", "a cat", "-o", str(tmp_path / "out")]
    assert explain([*args, "--model", str(tiny_model_dir), *FAST]) == 0
    written = _hashes(tmp_path / "out")
    assert set(written) == {"photo.png", "photo_cat.png", "photo_cat_map.png"}
    assert all(result_text(tmp_path / "out" / name) is not None for name in written)
    capsys.readouterr()
    assert explain([*args, "--model", str(tiny_model_dir), *FAST]) == 0
    assert "0 explained, 1 skipped" in capsys.readouterr().out
    assert _hashes(tmp_path / "out") == written


# ----------------------------------------------------------------------- 2. our outputs are never inputs


@pytest.mark.parametrize("command", ["upscale", "python"])
def test_an_output_folder_that_is_the_input_folder_is_safe_to_rerun(tiny_model_dir, tmp_path, capsys, command) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(photos / "a.jpg")
    _photo(photos / "b.jpg", seed=1)

    def run() -> tuple[int, str]:
        if command == "upscale":
            status = upscale([str(photos), "-o", str(photos), "--model", str(tiny_model_dir), "--prompt", "x", *FAST])
            return status, capsys.readouterr().out
        summary = restore_files([photos], photos, model=str(tiny_model_dir), prompt="x", steps=2, tile_size=64,
                                device="cpu", dtype="float32", progress=False)
        return (1 if summary.failed else 0), summary.report()

    assert run()[0] == 0
    first = _hashes(photos)
    assert set(first) == {"a.jpg", "b.jpg", "a.png", "b.png"}
    status, report = run()
    assert status == 0 and "0 done, 2 skipped" in report  # a.png and b.png were not taken for new photos
    assert _hashes(photos) == first


# ------------------------------------------------------------------------- 3. nothing to do is a mistake


@pytest.mark.parametrize("command", [upscale, explain])
def test_a_folder_without_images_is_one_line_and_writes_nothing(tmp_path, capsys, no_model, command) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    args = [str(tmp_path / "empty"), "-o", str(tmp_path / "out"), "--prompt", "a cat", *FAST]
    assert command(args + (["--words", "cat"] if command is explain else [])) == 2
    assert "holds no images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_python_route_refuses_mistakes_before_any_model_loads(tmp_path, no_model) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        restore_files([tmp_path / "empty"], tmp_path / "out")
    _photo(tmp_path / "a.png")
    with pytest.raises(ValueError, match="`upscale` must be a finite number > 0"):
        restore_files([tmp_path / "a.png"], tmp_path / "out", upscale=0)
    with pytest.raises(TypeError, match="`upscal` are not restoration settings"):
        restore_files([tmp_path / "a.png"], tmp_path / "out", upscal=2)
    with pytest.raises(ValueError, match="`workers` needs `engine` ray"):
        restore_files([tmp_path / "a.png"], tmp_path / "out", workers=2)
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------- 4. the Python route behaves as the command


def test_the_python_route_creates_its_output_folder_and_resumes(tiny_model_dir, tmp_path) -> None:
    _photo(tmp_path / "a.png")
    options = dict(model=str(tiny_model_dir), prompt="x", steps=2, tile_size=64, device="cpu", dtype="float32")
    summary = restore_files([tmp_path / "a.png"], tmp_path / "new" / "folder", progress=False, **options)
    assert summary.done == ["a.png"] and (tmp_path / "new" / "folder" / "a.png").is_file()
    again = restore_files([tmp_path / "a.png"], tmp_path / "new" / "folder", progress=False, **options)
    assert again.skipped == ["a.png"] and not again.done


def test_save_result_creates_the_folder_and_names_the_users_path_in_errors(tmp_path) -> None:
    """The README's Python example writes into a folder that does not exist yet."""
    image = np.zeros((8, 8, 3), np.float32)
    assert save_result(image, tmp_path / "restored" / "scan.tif").is_file()
    (tmp_path / "taken.png").mkdir()  # a folder where the file should go
    with pytest.raises(OSError) as failed:
        save_result(image, tmp_path / "taken.png")
    assert str(tmp_path / "taken.png") in str(failed.value) and ".faithdiff-tmp" not in str(failed.value)


# --------------------------------------------------------------------------- 5. a bad sidecar fails its image


@pytest.mark.parametrize("captioner", ["none", "auto"])
def test_a_broken_sidecar_fails_its_image_alone(tiny_model_dir, tmp_path, capsys, captioner) -> None:
    (tmp_path / "in").mkdir()
    for name in ("good", "bad"):
        _photo(tmp_path / "in" / f"{name}.png")
    (tmp_path / "in" / "bad.json").write_text('{"caption": "unfinished')
    args = [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(tiny_model_dir), *FAST]
    assert upscale([*args, "--captioner", captioner]) == 1
    out = capsys.readouterr().out
    assert "1 done, 0 skipped (already restored), 1 failed" in out
    assert "failed: bad.png: Caption sidecar" in out and "is not valid JSON" in out
    assert (tmp_path / "out" / "good.png").is_file() and not (tmp_path / "out" / "bad.png").exists()


# --------------------------------------------------------------- 6. decoded once, sidecar read once, checked once


def test_a_photo_is_decoded_once_and_its_sidecar_read_once(tiny_model_dir, tmp_path, monkeypatch) -> None:
    captioner_dir = tmp_path / "captioner"
    model, processor = tiny_captioner()
    model.save_pretrained(captioner_dir)
    processor.save_pretrained(captioner_dir)
    (tmp_path / "in").mkdir()
    _photo(tmp_path / "in" / "new.png")  # captioned, then restored
    _photo(tmp_path / "in" / "known.png", seed=2)
    (tmp_path / "in" / "known.json").write_text(json.dumps({"prompt": "A known photo."}))
    decoded, sidecars, model_checks = [], [], []
    read, read_text = photos_module.read_image, captions_module._read_text
    monkeypatch.setattr(photos_module, "read_image", lambda path: decoded.append(path) or read(path))
    monkeypatch.setattr(captions_module, "_read_text", lambda path: sidecars.append(path) or read_text(path))
    import faithdiff_pipeline.application.settings as settings_module

    check = settings_module.check_model_source
    monkeypatch.setattr(settings_module, "check_model_source", lambda m: model_checks.append(m) or check(m))
    import faithdiff_pipeline.image_io as image_io

    monkeypatch.setattr(image_io, "from_pil", lambda *a: pytest.fail("the pipeline decoded an image again"))
    args = [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(tiny_model_dir), *FAST]
    assert upscale([*args, "--captioner", str(captioner_dir)]) == 0
    assert sorted(decoded) == sorted(str(tmp_path / "in" / n) for n in ("known.png", "new.png"))
    assert sidecars == [str(tmp_path / "in" / "known.json")]
    assert model_checks == [str(tiny_model_dir)]  # the settings are checked once, where they are parsed


# --------------------------------------------------------------------------------- fidelity in every result


def test_upscale_fidelity_writes_maps_metadata_summary_and_exit_status(tiny_model_dir, tmp_path, capsys) -> None:
    from faithdiff_pipeline.fidelity import measure_fidelity
    from faithdiff_pipeline.image_io import read_image

    _photo(tmp_path / "a.png")
    args = [str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--prompt", "x",
            *FAST, "--fidelity", "--seeds", "2"]
    # The tiny random model invents everything: far below any sensible threshold.
    assert upscale([*args, "--fidelity-threshold", "60", "--fail-below-threshold"]) == 3
    out = capsys.readouterr().out
    assert "fidelity: a.png: LR-PSNR" in out and "below the fidelity threshold of 60 dB LR-PSNR: a.png" in out
    names = {p.name for p in (tmp_path / "out").iterdir()}
    maps = {f"a_{name}{raw}.png" for name in ("consistency", "added_detail", "spread") for raw in ("", "_raw")}
    assert names == {"a.png", *maps}
    assert all(result_text(tmp_path / "out" / name) is not None for name in names)  # all ours: a rerun skips them
    stored = json.loads(result_text(tmp_path / "out" / "a.png")["fidelity"])
    # The stored numbers are those of the result measured against its input, independently.
    restored = read_image(tmp_path / "out" / "a.png").as_float()
    again = measure_fidelity(restored, read_image(tmp_path / "a.png").as_float())
    assert stored["lr_psnr"] == pytest.approx(again.lr_psnr, abs=0.05) and stored["seed_count"] == 2
    assert upscale(args) == 0 and "0 done, 1 skipped" in capsys.readouterr().out
    assert upscale([*args[:-3], "--fidelity-threshold", "1"]) == 2  # a threshold without --fidelity
    assert "--fidelity-threshold judges the fidelity numbers: add --fidelity" in capsys.readouterr().err


def test_seeds_without_fidelity_is_refused(tmp_path, no_model) -> None:
    _photo(tmp_path / "a.png")
    with pytest.raises(ValueError, match="`seeds` 3 measures the spread of the results: add `fidelity`"):
        restore_files([tmp_path / "a.png"], tmp_path / "out", seeds=3)


def test_fidelity_maps_have_the_results_size_and_orientation(tiny_model_dir, tmp_path) -> None:
    """A phone photo stored turned (EXIF orientation 6): the result is upright, and so is every map, which is the
    one measured against the upright input."""
    from faithdiff_pipeline.fidelity import measure_fidelity
    from faithdiff_pipeline.image_io import read_image

    _photo(tmp_path / "plain.png")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    with PIL.Image.open(tmp_path / "plain.png") as plain:
        plain.save(tmp_path / "phone.jpg", exif=exif, quality=98)
    summary = restore_files([tmp_path / "phone.jpg"], tmp_path / "out", model=str(tiny_model_dir), prompt="x",
                            steps=2, tile_size=64, device="cpu", dtype="float32", fidelity=True, progress=False)
    assert summary.done == ["phone.jpg"]
    restored = read_image(tmp_path / "out" / "phone.png")
    assert restored.size == (32, 48)  # portrait, as the phone shows it
    report = measure_fidelity(restored.as_float(), read_image(tmp_path / "phone.jpg").as_float())
    for name in ("consistency", "added_detail"):
        with PIL.Image.open(tmp_path / "out" / f"phone_{name}_raw.png") as raw:
            assert raw.size == restored.size and raw.getexif().get(0x0112, 1) == 1
            stored = np.asarray(raw, dtype=np.float64) / 65535.0
        with PIL.Image.open(tmp_path / "out" / f"phone_{name}.png") as heat:
            assert heat.size == restored.size
        # Measured on the float result before it was written: within what 8-bit writing moves the map.
        assert np.abs(stored - report.maps()[name]).mean() < 0.02


def test_the_package_has_no_import_cycle_and_no_module_uses_anothers_underscore_names() -> None:
    """Dependencies run one way (commands on the application layer, that on the library), as the shared checker
    reads them from the source."""
    import subprocess
    import sys
    from pathlib import Path

    from shared_data import shared_path

    checker = shared_path("tools", "import_graph.py")
    src = Path(__file__).resolve().parents[1] / "src"
    result = subprocess.run(
        [sys.executable, str(checker), str(src), "faithdiff_pipeline"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("0 import cycles, 0 imports of another module's underscore names")
