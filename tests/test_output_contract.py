"""The output contract of faithdiff-eval, faithdiff-prepare-data, faithdiff-train and faithdiff-convert (issue 21):

1. a file we did not make is never written over, replaced or deleted (``--overwrite`` replaces only our own outputs,
   nothing under an input folder is ever deleted);
2. an output folder inside an input folder is left out of the input scan;
3. inputs that give nothing to do are one line and exit status 2, and write nothing;
4. the Python functions behave as the commands (they create the output folder, their errors name the user's paths);
5. a bad sidecar, ground-truth file or configuration fails its item, or the command before any work, in one line;
6. each setting is checked once, where it is parsed.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from faithdiff_pipeline import release_settings as release
from faithdiff_pipeline.evaluation import make_synthetic_set
from faithdiff_pipeline.evaluation.cli import build_parser as eval_parser
from faithdiff_pipeline.evaluation.cli import main as eval_main


def _gradient(width: int, height: int, phase: int = 0) -> PIL.Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 7 + phase) % 256, (y * 9) % 256, ((x * y) // 3 + phase) % 256], axis=-1).astype(np.uint8)
    return PIL.Image.fromarray(rgb)


def _photos(folder: Path, names: tuple[str, ...] = ("a", "b"), size: tuple[int, int] = (40, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        _gradient(*size, phase=30 * i).save(folder / f"{name}.png")
    return folder


def _pairs(hq: Path, lq: Path, names: tuple[str, ...] = ("a", "b")) -> None:
    _photos(hq, names, (32, 24))
    lq.mkdir(parents=True, exist_ok=True)
    for name in names:
        with PIL.Image.open(hq / f"{name}.png") as image:
            image.resize((16, 12), PIL.Image.BICUBIC).save(lq / f"{name}.png")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys, prog: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: ")
    assert "Traceback" not in lines[0]
    return lines[0]


def _eval_error(capsys) -> str:
    return _one_error_line(capsys, "faithdiff-eval")


MAKE_SET = ["--preset", "dasr-level1", "--seed", "0"]


# ---------------------------------------------------------------------------------------------------------------------
# faithdiff-eval: the synthetic set's folder


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("where", ["parent", "same", "inside", "contains"])
def test_eval_make_set_never_writes_over_or_deletes_its_source(tmp_path, capsys, where, overwrite) -> None:
    """The reported bug: `--make-set DATA/hq --set-dir DATA --overwrite` deleted the photos in DATA/hq."""
    data = tmp_path / "DATA"
    source = _photos(data / "hq") if where != "contains" else _photos(data / "hq" / "originals")
    set_dir = {"parent": data, "same": data / "hq", "inside": data / "hq" / "set", "contains": data}[where]
    before = _snapshot(data)
    assert eval_main(["--make-set", str(source), *MAKE_SET, "--set-dir", str(set_dir), *overwrite]) == 2
    error = _eval_error(capsys)
    assert "--set-dir" in error
    assert "an input of the set" in error
    assert _snapshot(data) == before
    assert not (data / "lq").exists()
    assert not (set_dir / "manifest.json").exists()


def test_eval_overwrite_replaces_only_the_images_its_manifest_lists(tmp_path, capsys) -> None:
    source, set_dir = _photos(tmp_path / "photos"), tmp_path / "set"
    argv = ["--make-set", str(source), *MAKE_SET, "--set-dir", str(set_dir)]
    assert eval_main(argv) == 0
    capsys.readouterr()
    first = _snapshot(set_dir)
    (set_dir / "notes.txt").write_text("mine")
    (set_dir / "hq" / "readme.txt").write_text("mine too")
    # Another seed: refused without --overwrite, and the refusal suggests it.
    other = [*argv[:-1], str(set_dir)]
    other[other.index("--seed") + 1] = "1"
    assert eval_main(other) == 2
    assert "--overwrite" in _eval_error(capsys)
    assert eval_main([*other, "--overwrite"]) == 0
    after = _snapshot(set_dir)
    assert after["notes.txt"] == b"mine"
    assert after["hq/readme.txt"] == b"mine too"
    assert after["lq/a.png"] != first["lq/a.png"]
    # Back to seed 0: the same set, byte for byte.
    assert eval_main([*argv, "--overwrite"]) == 0
    assert {k: v for k, v in _snapshot(set_dir).items() if k.endswith(".png")} == {
        k: v for k, v in first.items() if k.endswith(".png")
    }

    # A new source image whose place in the set holds a file the set did not write: refused, overwrite or not.
    _gradient(40, 32, phase=99).save(source / "c.png")
    _gradient(8, 8).save(set_dir / "lq" / "c.png")
    kept = _snapshot(set_dir)
    capsys.readouterr()
    assert eval_main([*argv, "--overwrite"]) == 2
    assert "did not write are in the way" in _eval_error(capsys)
    assert _snapshot(set_dir) == kept


@pytest.mark.parametrize("manifest", [None, "not json", '{"name": "my own manifest"}'])
def test_eval_set_folder_that_is_not_ours_is_refused_even_with_overwrite(tmp_path, capsys, manifest) -> None:
    source, set_dir = _photos(tmp_path / "photos"), tmp_path / "mine"
    _photos(set_dir / "hq", ("a",))
    if manifest is not None:
        (set_dir / "manifest.json").write_text(manifest)
    before = _snapshot(set_dir)
    assert eval_main(["--make-set", str(source), *MAKE_SET, "--set-dir", str(set_dir), "--overwrite"]) == 2
    assert "--set-dir" in _eval_error(capsys) or manifest is not None
    assert _snapshot(set_dir) == before


def test_eval_text_set_never_writes_over_its_ground_truth(tmp_path, capsys) -> None:
    source, set_dir = _photos(tmp_path / "photos"), tmp_path / "set"
    boxes = set_dir / "text" / "hq"
    boxes.mkdir(parents=True)
    for name in ("a", "b"):
        (boxes / f"gt_{name}.txt").write_text("1,1,20,1,20,10,1,10,HELLO\n")
    before = _snapshot(set_dir)
    argv = ["--make-set", str(source), *MAKE_SET, "--set-dir", str(set_dir), "--ocr-truth", str(boxes)]
    assert eval_main([*argv, "--overwrite"]) == 2
    assert "an input of the set" in _eval_error(capsys)
    assert _snapshot(set_dir) == before


# ---------------------------------------------------------------------------------------------------------------------
# faithdiff-eval: results and reports in --out


def _eval_argv(hq: Path, lq: Path, out: Path, *more: str) -> list[str]:
    return ["--hq", str(hq), "--lq", str(lq), "--out", str(out), "--metrics", "psnr", "--grid-images", "0", *more]


def test_eval_never_replaces_a_results_folder_or_reports_it_did_not_write(tmp_path, capsys) -> None:
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    _pairs(hq, lq)
    out = tmp_path / "out"
    mine = out / "results" / "lanczos"
    _photos(mine, ("a",))
    before = _snapshot(out)
    for overwrite in ([], ["--overwrite"]):
        assert eval_main(_eval_argv(hq, lq, out, *overwrite)) == 2
        error = _eval_error(capsys)
        assert "holds files but no settings.json" in error
        assert "--out" in error
    assert _snapshot(out) == before

    (mine / "settings.json").write_text("my settings, not JSON")
    assert eval_main(_eval_argv(hq, lq, out, "--overwrite")) == 2
    assert "is not the settings of results made by faithdiff-eval" in _eval_error(capsys)
    assert (mine / "settings.json").read_text() == "my settings, not JSON"

    # Reports of the user's in --out.
    other = tmp_path / "other"
    other.mkdir()
    (other / "table.md").write_text("my table")
    assert eval_main(_eval_argv(hq, lq, other, "--overwrite")) == 2
    assert "holds table.md, which faithdiff-eval did not write" in _eval_error(capsys)
    assert (other / "table.md").read_text() == "my table"
    assert not (other / "results").exists()

    # Ours: a rerun, and a rerun with --overwrite, replace them; a run with only folder methods too.
    capsys.readouterr()
    ours = tmp_path / "ours"
    assert eval_main(_eval_argv(hq, lq, ours)) == 0
    assert eval_main(_eval_argv(hq, lq, ours, "--overwrite")) == 0
    only_folders = tmp_path / "folders"
    assert eval_main(_eval_argv(hq, lq, only_folders, "--method", f"oracle={hq}")) == 0
    assert eval_main(_eval_argv(hq, lq, only_folders, "--method", f"oracle={hq}")) == 0
    capsys.readouterr()


def test_eval_out_in_an_input_folder_is_never_read_as_input(tmp_path, capsys) -> None:
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    _pairs(hq, lq)
    inside = lq / "report"
    for _ in range(2):  # a rerun finds the same two pairs: the reports in lq/report are not read
        assert eval_main(_eval_argv(hq, lq, inside, "--grid-images", "2")) == 0
        assert {r.split(",")[1] for r in (inside / "metrics.csv").read_text().splitlines()[1:]} == {"a", "b"}
    before = _snapshot(lq)
    capsys.readouterr()
    assert eval_main(_eval_argv(hq, lq, lq)) == 2
    error = _eval_error(capsys)
    assert "--out" in error
    assert "is the LQ folder" in error
    assert _snapshot(lq) == before
    source = _photos(tmp_path / "photos")
    argv = ["--make-set", str(source), *MAKE_SET, "--set-dir", str(tmp_path / "set"), "--out", str(source)]
    assert eval_main(argv) == 2
    assert "--make-set" in _eval_error(capsys)
    assert not (tmp_path / "set").exists()


# ---------------------------------------------------------------------------------------------------------------------
# faithdiff-eval: nothing to do, the Python route, bad sidecars and ground truth, settings


def test_eval_inputs_that_pair_nothing_are_one_line_and_write_nothing(tmp_path, capsys) -> None:
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    _photos(hq, ("a", "b"), (32, 24))
    _photos(lq, ("c", "d"), (16, 12))
    out = tmp_path / "out"
    assert eval_main(_eval_argv(hq, lq, out)) == 2
    assert "lacks 2 image(s)" in _eval_error(capsys)
    assert not out.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    set_dir = tmp_path / "set"
    assert eval_main(["--make-set", str(empty), *MAKE_SET, "--set-dir", str(set_dir), "--out", str(out)]) == 2
    assert "holds no images" in _eval_error(capsys)
    assert not set_dir.exists()
    assert not out.exists()


def test_make_synthetic_set_creates_its_folder_and_names_the_users_paths(tmp_path, monkeypatch) -> None:
    source = _photos(tmp_path / "photos")
    dataset = make_synthetic_set(source, tmp_path / "new" / "nested" / "set", "dasr-level1", progress=False)
    assert [pair.name for pair in dataset.pairs] == ["a", "b"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"`set_dir` .*file.* is a file"):
        make_synthetic_set(source, tmp_path / "file", "dasr-level1", progress=False)
    with pytest.raises(ValueError, match="an input of the set"):
        make_synthetic_set(source, source / "set", "dasr-level1", progress=False)

    import faithdiff_pipeline.evaluation.datasets as datasets

    def full_disk(image, target, **params):
        hidden = Path(target).with_name(f".{Path(target).name}.host-1.abcd.faithdiff-tmp")
        raise OSError(errno.ENOSPC, "No space left on device", str(hidden))

    monkeypatch.setattr(datasets, "save_image", full_disk)
    with pytest.raises(ValueError) as caught:
        make_synthetic_set(source, tmp_path / "full", "dasr-level1", progress=False)
    message = str(caught.value)
    assert str(tmp_path / "full" / "hq" / "a.png") in message
    assert "No space left" in message
    assert "faithdiff-tmp" not in message


def test_eval_a_broken_caption_sidecar_fails_that_image_alone(tmp_path, tiny_model_dir, capsys) -> None:
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    _pairs(hq, lq, ("a", "b", "c"))
    (lq / "a.json").write_text('{"prompt": "A gradient."}')
    (lq / "b.json").write_text("{broken")
    (lq / "c.json").write_text('{"prompt": "Another gradient."}')
    out = tmp_path / "out"
    argv = _eval_argv(hq, lq, out, "--method", f"faithdiff={tiny_model_dir}", "--captions", "sidecar")
    argv += ["--steps", "1", "--tile-size", "64", "--device", "cpu"]
    assert eval_main(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "faithdiff/" in line]
    assert len(lines) == 2, lines  # the failure, then the summary
    assert "faithdiff/b: restoring failed" in lines[0]
    assert "b.json" in lines[0]
    assert "not valid JSON" in lines[0]
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1] for row in rows] == ["a", "c"]


def test_eval_ground_truth_that_is_not_json_is_one_line_before_any_work(tmp_path, capsys) -> None:
    source, set_dir = _photos(tmp_path / "photos"), tmp_path / "set"
    truth = tmp_path / "truth.json"
    truth.write_text("a: HELLO")
    assert eval_main(["--make-set", str(source), *MAKE_SET, "--set-dir", str(set_dir), "--ocr-truth", str(truth)]) == 2
    assert "is not JSON" in _eval_error(capsys)
    assert not set_dir.exists()


def test_eval_settings_are_checked_once_and_the_defaults_are_the_releases(tmp_path, capsys) -> None:
    from faithdiff_pipeline.evaluation import methods

    args = eval_parser().parse_args([])
    assert (args.steps, args.tile_size) == (release.NUM_INFERENCE_STEPS, release.TILE_SIZE)
    defaults = methods.SamplingSettings()
    assert (defaults.steps, defaults.tile_size) == (release.NUM_INFERENCE_STEPS, release.TILE_SIZE)
    text = Path(methods.__file__).read_text()
    assert "argparse" not in text
    assert "args." not in text
    assert "Namespace" not in text

    with pytest.raises(ValueError, match="`tile_size` must be a multiple of 8"):
        methods.SamplingSettings(tile_size=100)
    with pytest.raises(ValueError, match="`prompt` .* conflicts with `captions` sidecar"):
        methods.SamplingSettings(prompt="x", captions="sidecar")
    # On the command line, before any set is built or folder made: named by the flags.
    source, set_dir = _photos(tmp_path / "photos"), tmp_path / "set"
    for flags, expected in (
        (["--tile-size", "100"], "--tile-size must be a multiple of 8"),
        (["--steps", "0"], "--steps must be"),
        (["--upscale", "-2"], "--upscale must be a number > 0"),
        (["--prompt", "x", "--captions", "sidecar"], "--prompt gives one prompt for every image; it conflicts with "
         "--captions sidecar"),
    ):
        argv = ["--make-set", str(source), *MAKE_SET, "--set-dir", str(set_dir), "--out", str(tmp_path / "out")]
        assert eval_main([*argv, *flags]) == 2
        assert expected in _eval_error(capsys)
        assert not set_dir.exists()


# ---------------------------------------------------------------------------------------------------------------------
# faithdiff-prepare-data

from faithdiff_pipeline.training import prepare as prepare_module  # noqa: E402
from faithdiff_pipeline.training.prepare import main as prepare_main  # noqa: E402
from faithdiff_pipeline.training.prepare import prepare_training_set  # noqa: E402

PREPARE = ["--hq-size", "32", "--captioner", "none", "--no-progress"]


def _prepare_error(capsys) -> str:
    return _one_error_line(capsys, "faithdiff-prepare-data")


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", ["foreign files", "foreign dataset.json", "a file"])
def test_prepare_data_never_writes_into_a_folder_it_did_not_make(tmp_path, capsys, monkeypatch, case) -> None:
    photos = _photos(tmp_path / "photos")
    output = tmp_path / "mine"
    if case == "a file":
        output.write_text("not a folder")
    else:
        _photos(output / "hq", ("x",))
        (output / "manifest.jsonl").write_text("my notes\n")
        if case == "foreign dataset.json":
            (output / "dataset.json").write_text('{"name": "my dataset"}')
    before = output.read_bytes() if output.is_file() else _snapshot(output)
    assert prepare_main([str(photos), "-o", str(output), *PREPARE]) == 2
    error = _prepare_error(capsys)
    assert "--output" in error or "dataset.json" in error
    # Refused before a captioner loads, too.
    from faithdiff_pipeline import loading

    monkeypatch.setattr(loading, "plan_captioner", lambda *a, **k: pytest.fail("a captioner was looked for"))
    argv = [str(photos), "-o", str(output), "--hq-size", "32", "--captioner", "some/captioner", "--no-progress"]
    assert prepare_main(argv) == 2
    capsys.readouterr()
    assert (output.read_bytes() if output.is_file() else _snapshot(output)) == before


def test_prepare_data_output_inside_its_input_is_not_an_input(tmp_path, capsys) -> None:
    """The reported bug: the set inside its photos folder took its own crops for new photos on every rerun."""
    photos = _photos(tmp_path / "photos", size=(48, 40))
    inside, outside = photos / "set", tmp_path / "set"
    assert prepare_main([str(photos), "-o", str(outside), *PREPARE]) == 0
    for _ in range(3):  # the documented resume: run the same command again
        assert prepare_main([str(photos), "-o", str(inside), *PREPARE]) == 0
        assert len(_manifest(inside)) == 2
    assert "0 crop(s) written, 2 already done" in capsys.readouterr().out
    # The same crops, byte for byte, as a set made outside the photos folder.
    assert [r["hq"] for r in _manifest(inside)] == [r["hq"] for r in _manifest(outside)]
    for record in _manifest(outside):
        assert (inside / record["hq"]).read_bytes() == (outside / record["hq"]).read_bytes()
        assert (inside / record["lq"]).read_bytes() == (outside / record["lq"]).read_bytes()
    # Another set beside it takes the photos only, not the first set's crops.
    assert prepare_main([str(photos), "-o", str(photos / "set-16"), *PREPARE[2:], "--hq-size", "16"]) == 0
    assert sorted(Path(r["source"]).name for r in _manifest(photos / "set-16")) == ["a.png", "b.png"]


def test_prepare_data_without_images_is_one_line_and_writes_nothing(tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    (empty / "notes" / "readme.txt").write_text("no photos here")
    assert prepare_main([str(empty), "-o", str(tmp_path / "set"), *PREPARE]) == 2
    assert "no images in" in _prepare_error(capsys)
    assert not (tmp_path / "set").exists()
    # A folder whose only images are a set of ours inside it has nothing to prepare either.
    photos = _photos(tmp_path / "photos", size=(48, 40))
    assert prepare_main([str(photos), "-o", str(photos / "set"), *PREPARE]) == 0
    for path in photos.glob("*.png"):
        path.unlink()
    capsys.readouterr()
    assert prepare_main([str(photos), "-o", str(photos / "set"), *PREPARE]) == 2
    assert "the output folder is not an input" in _prepare_error(capsys)


def test_prepare_training_set_creates_its_folder_and_names_the_users_paths(tmp_path, monkeypatch) -> None:
    photos = _photos(tmp_path / "photos", size=(48, 40))
    output = tmp_path / "new" / "nested" / "set"
    summary = prepare_training_set([photos], output, hq_size=32, captions="none", progress=False)
    assert summary.crops_written == 2
    assert (output / "dataset.json").is_file()
    with pytest.raises(ValueError, match="no images in"):
        prepare_training_set([tmp_path / "new"], tmp_path / "other", hq_size=32, captions="none", progress=False)
    assert not (tmp_path / "other").exists()

    def full_disk(image, target, **params):
        hidden = Path(target).with_name(f".{Path(target).name}.host-1.abcd.faithdiff-tmp")
        raise OSError(errno.ENOSPC, "No space left on device", str(hidden))

    monkeypatch.setattr(prepare_module, "save_image", full_disk)
    with pytest.raises(ValueError) as caught:
        prepare_training_set([photos], tmp_path / "full", hq_size=32, captions="none", progress=False)
    message = str(caught.value)
    assert str(tmp_path / "full" / "hq" / "photos") in message
    assert "No space left" in message
    assert "faithdiff-tmp" not in message


def test_prepare_data_a_broken_caption_sidecar_fails_that_image_alone(tmp_path, capsys) -> None:
    photos = _photos(tmp_path / "photos", ("a", "b", "c"), size=(48, 40))
    (photos / "a.json").write_text('{"prompt": "A gradient."}')
    (photos / "b.json").write_text("{broken")
    output = tmp_path / "set"
    argv = [str(photos), "-o", str(output), "--hq-size", "32", "--sidecar-captions", "--no-progress"]
    assert prepare_main(argv) == 0
    out = capsys.readouterr().out
    assert "1 unreadable" in out
    line = next(line for line in out.splitlines() if "unreadable:" in line)
    assert "b.png" in line
    assert "b.json" in line
    assert "not valid JSON" in line
    assert {Path(r["source"]).name: r["caption"] for r in _manifest(output)} == {"a.png": "A gradient.", "c.png": ""}
    assert not any(output.rglob("b_png_*.png"))  # no crop made for the failed image


# ---------------------------------------------------------------------------------------------------------------------
# faithdiff-train

from faithdiff_pipeline.training import TrainingConfig, TrainingSetupError  # noqa: E402
from faithdiff_pipeline.training.train import main as train_main  # noqa: E402
from faithdiff_pipeline.training.train import training_dataset  # noqa: E402


@pytest.fixture
def no_model_loads(monkeypatch):
    from faithdiff_pipeline.training import stages

    monkeypatch.setattr(stages, "load_starting_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))


def _train_argv(tmp_path: Path, output: Path, *more: str) -> list[str]:
    base = tmp_path / "sdxl"
    base.mkdir(exist_ok=True)
    return [
        "--stage", "1", "--pretrained-model", str(base), "--output-dir", str(output), "--report-to", "none",
        "--hq-size", "32", "--train-batch-size", "1", "--effective-batch-size", "1", "--validation-steps", "0",
        # As every training test sets it: accelerate keeps one state per process, and a second precision is refused.
        "--mixed-precision", "no",
        *more,
    ]  # fmt: skip


def _train_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "faithdiff-train: error:" in line]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("in_the_way", ["output_dir", "checkpoint-2", "validation", "logs"])
def test_train_refuses_an_output_folder_it_cannot_write_before_any_model_loads(
    tmp_path, capsys, no_model_loads, in_the_way
) -> None:
    photos = _photos(tmp_path / "photos", size=(48, 40))
    output = tmp_path / "run"
    if in_the_way == "output_dir":
        output.write_text("a file")
    else:
        output.mkdir()
        (output / in_the_way).write_text("a file of mine")
    assert train_main(_train_argv(tmp_path, output, "--train-folders", str(photos))) == 2
    error = _train_error(capsys)
    assert "`output_dir`" in error and (in_the_way == "output_dir" or in_the_way in error)
    if in_the_way != "output_dir":
        assert (output / in_the_way).read_text() == "a file of mine"


def test_train_output_inside_a_training_folder_is_not_training_data(tmp_path) -> None:
    photos = _photos(tmp_path / "photos", ("a", "b"), size=(48, 40))
    output = photos / "run"
    _photos(output / "validation" / "step-2", ("00",), size=(48, 40))  # what a validation writes
    config = TrainingConfig(
        stage=1, pretrained_model=str(tmp_path), train_folders=[str(photos)], output_dir=str(output), hq_size=32
    )
    dataset = training_dataset(config)
    assert sorted(source.path.name for source in dataset.sources) == ["a.png", "b.png"]


def test_train_inputs_without_images_are_one_line_and_write_nothing(tmp_path, capsys, no_model_loads) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    output = tmp_path / "run"
    assert train_main(_train_argv(tmp_path, output, "--train-folders", str(empty))) == 2
    assert "No usable image" in _train_error(capsys)
    assert not output.exists()


@pytest.mark.parametrize("where", ["train_folders", "validation_images", "config"])
def test_train_a_broken_sidecar_or_config_is_one_line_before_any_model_loads(
    tmp_path, capsys, no_model_loads, where
) -> None:
    photos = _photos(tmp_path / "photos", ("a", "b"), size=(48, 40))
    output = tmp_path / "run"
    argv = _train_argv(tmp_path, output, "--train-folders", str(photos))
    if where == "train_folders":
        (photos / "b.json").write_text("{broken")
        argv += ["--captions", "sidecar"]
    elif where == "validation_images":
        lq = _photos(tmp_path / "lq", ("v",), size=(16, 16))
        (lq / "v.json").write_text("[1, 2]")
        argv += ["--validation-steps", "1", "--validation-images", str(lq / "v.png")]
    else:
        (tmp_path / "train.yaml").write_text("- a list\n- not settings\n")
        argv += ["--config", str(tmp_path / "train.yaml")]
    assert train_main(argv) == 2
    error = _train_error(capsys)
    assert {"train_folders": "b.json", "validation_images": "v.json", "config": "train.yaml"}[where] in error
