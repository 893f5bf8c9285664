"""faithdiff-upscale end to end with tiny components: outputs, metadata, resumption, failures, bad input."""

from __future__ import annotations

import json

import PIL.Image
import pytest

from shared_data import shared_path

from tiny_models import tiny_captioner, tiny_components
from faithdiff_pipeline import FaithDiffSDXLPipeline
from faithdiff_pipeline.cli import main

FAST = ["--steps", "2", "--tile-size", "64", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    FaithDiffSDXLPipeline(**tiny_components()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captioner")
    model, processor = tiny_captioner()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _lq_set(folder, count: int, size=(24, 20)) -> list:
    """LQ versions of the sample photos (small, so that tiny components run quickly)."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = sorted(shared_path("samples").glob("*.*g"))
    paths = []
    for i in range(count):
        with PIL.Image.open(samples[i % len(samples)]) as photo:
            lq = photo.convert("RGB").rotate(90 * (i // len(samples))).resize(size, PIL.Image.BICUBIC)
        path = folder / f"photo_{i:02d}.png"
        lq.save(path)
        paths.append(path)
    return paths


def _cli(model_dir, *args) -> int:
    return main([*args, "--model", str(model_dir), *FAST])


def test_restores_a_folder_with_metadata_and_compare(model_dir, tmp_path, capsys) -> None:
    inputs = _lq_set(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert (
        _cli(model_dir, str(tmp_path / "in"), "-o", str(out), "--prompt", "An old photo.", "--compare", "--seed", "7")
        == 0
    )
    assert "3 done, 0 skipped (already restored), 0 failed" in capsys.readouterr().out
    for path in inputs:
        with PIL.Image.open(out / f"{path.stem}.png") as result:
            assert result.size == (48, 40)
            parameters = json.loads(result.text["parameters"])
            assert result.text["caption"] == "An old photo."
        assert parameters["seed"] == 7 and parameters["steps"] == 2 and parameters["input"] == path.name
        with PIL.Image.open(out / f"{path.stem}_compare.png") as compare:
            assert compare.size == (96, 40)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_interrupted_run_resumes_without_redoing_finished_images(model_dir, tmp_path, monkeypatch, capsys) -> None:
    _lq_set(tmp_path / "in", 20)
    out = tmp_path / "out"
    calls = []
    original_call = FaithDiffSDXLPipeline.__call__

    def interrupt_at_eighth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(FaithDiffSDXLPipeline, "__call__", interrupt_at_eighth)
    assert _cli(model_dir, str(tmp_path / "in"), "-o", str(out)) == 130
    assert "interrupted" in capsys.readouterr().err
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert len(finished) == 7 and not [p for p in out.iterdir() if p.name.startswith(".")]

    monkeypatch.setattr(FaithDiffSDXLPipeline, "__call__", original_call)
    counted = []
    monkeypatch.setattr(
        FaithDiffSDXLPipeline, "__call__", lambda self, *a, **k: counted.append(1) or original_call(self, *a, **k)
    )
    assert _cli(model_dir, str(tmp_path / "in"), "-o", str(out)) == 0
    assert len(counted) == 13
    assert "13 done, 7 skipped" in capsys.readouterr().out
    assert len(list(out.glob("*.png"))) == 20
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())

    assert _cli(model_dir, str(tmp_path / "in" / "photo_00.png"), "-o", str(out), "--overwrite") == 0
    assert (out / "photo_00.png").stat().st_mtime_ns != finished["photo_00.png"]


def test_a_failing_image_is_reported_and_the_run_goes_on(model_dir, tmp_path, capsys) -> None:
    _lq_set(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert _cli(model_dir, str(tmp_path / "in"), "-o", str(tmp_path / "out")) == 1
    output = capsys.readouterr().out
    assert (
        "2 done, 0 skipped (already restored), 1 failed" in output
        and "failed: broken.jpg: not a readable image" in output
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["photo_00.png", "photo_01.png"]


def test_caption_modes(model_dir, captioner_dir, tmp_path, capsys) -> None:
    inputs = _lq_set(tmp_path / "in", 2)
    (tmp_path / "in" / "photo_00.json").write_text(
        json.dumps({"caption": "The image features a red house. It is old."})
    )

    def caption_of(out, name):
        with PIL.Image.open(out / f"{name}.png") as image:
            return image.text["caption"]

    assert _cli(model_dir, str(tmp_path / "in"), "-o", str(tmp_path / "sidecar"), "--caption", "sidecar") == 1
    assert "failed: photo_01.png: no caption sidecar photo_01.json" in capsys.readouterr().out
    assert caption_of(tmp_path / "sidecar", "photo_00") == "A red house. It is old.."

    assert _cli(model_dir, str(tmp_path / "in"), "-o", str(tmp_path / "none"), "--caption", "none") == 0
    assert caption_of(tmp_path / "none", "photo_00") == ""

    assert (
        _cli(
            model_dir,
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "auto"),
            "--captioner",
            str(captioner_dir),
        )
        == 0
    )
    assert caption_of(tmp_path / "auto", "photo_00") == "A red house. It is old.."  # a sidecar wins
    written = json.loads((tmp_path / "in" / "photo_01.json").read_text())
    from faithdiff_pipeline.captioning import clean_caption

    assert caption_of(tmp_path / "auto", "photo_01") == clean_caption(written["caption"])
    assert inputs[1].exists()


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda tmp: None, ["missing.png"], "input 'missing.png' does not exist"),
        (lambda tmp: (tmp / "empty").mkdir(), ["empty"], "folder 'empty' holds no images"),
        (lambda tmp: (tmp / "notes.txt").write_text("x"), ["notes.txt"], "input 'notes.txt' is not a supported image"),
        (lambda tmp: None, ["*.png"], "no images match '*.png'"),
        (
            lambda tmp: (tmp / "a.png").write_bytes(b"") or (tmp / "out").write_text("x"),
            ["a.png", "-o", "out"],
            "--output-dir 'out' is a file",
        ),
        (
            lambda tmp: (tmp / "a.png").write_bytes(b""),
            ["a.png", "--prompt", "x", "--caption", "sidecar"],
            "--prompt gives a fixed prompt; it conflicts with --caption sidecar",
        ),
        (
            lambda tmp: (tmp / "a.png").write_bytes(b""),
            ["a.png", "--captioner", "none", "--captioner-quantization", "4bit"],
            "--captioner none writes no captions",
        ),
        (
            lambda tmp: (tmp / "a.png").write_bytes(b""),
            ["a.png", "--compile", "--offload", "model"],
            "--compile keeps the UNet on the device; use --offload text-encoders, not model",
        ),
        (
            lambda tmp: (tmp / "a.png").write_bytes(b""),
            ["a.png", "--captioner", "llava-hf/llava-1.5-7b-hf", "--captioner-quantization", "4bit", "--device", "cpu"],
            "--captioner-quantization '4bit' needs a CUDA GPU (bitsandbytes), and the device is cpu",
        ),
        (
            lambda tmp: [(tmp / d).mkdir() for d in "xy"] and [(tmp / d / "a.png").write_bytes(b"") for d in "xy"],
            ["x", "y"],
            "would both be written as a.png",
        ),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path, monkeypatch, capsys, make, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    make(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("faithdiff-upscale: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_compiled_unet_and_offloaded_text_encoders_restore_the_same_images(model_dir, tmp_path) -> None:
    """--compile (whole UNet, static shapes) with --offload text-encoders gives the plain run's images: float32
    agreement to 1e-4 before quantisation, so PNG levels differ by at most one."""
    import numpy as np
    from torch._dynamo.utils import counters

    _lq_set(tmp_path / "in", 2)
    common = [str(tmp_path / "in"), "--prompt", "An old photo.", "--seed", "3"]
    assert _cli(model_dir, *common, "-o", str(tmp_path / "plain")) == 0
    counters.clear()
    assert _cli(model_dir, *common, "-o", str(tmp_path / "fast"), "--compile", "--offload", "text-encoders") == 0
    assert counters["stats"]["unique_graphs"] >= 1  # the UNet did run compiled
    for plain in sorted((tmp_path / "plain").glob("*.png")):
        with PIL.Image.open(plain) as a, PIL.Image.open(tmp_path / "fast" / plain.name) as b:
            difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert difference.max() <= 1


def test_not_a_pipeline_folder_is_a_one_line_error(tmp_path, capsys) -> None:
    _lq_set(tmp_path / "in", 1)
    assert main([str(tmp_path / "in"), "--model", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "no model_index.json" in err and len(err.strip().splitlines()) == 1


def test_several_processes_split_the_inputs(model_dir, tmp_path) -> None:
    """Two processes as accelerate/torchrun start them (CPU, gloo): each restores its own share, none twice."""
    import os
    import socket
    import subprocess
    import sys

    _lq_set(tmp_path / "in", 4)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "faithdiff_pipeline.cli",
        str(tmp_path / "in"),
        "-o",
        str(tmp_path / "out"),
        "--model",
        str(model_dir),
        *FAST,
    ]
    processes = []
    for rank in range(2):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE="2",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
        )
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=240) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert all("2 done, 0 skipped" in out for out, _ in outputs)
    assert len(list((tmp_path / "out").glob("*.png"))) == 4


def test_captions_only_writes_missing_sidecars_and_loads_no_pipeline(
    captioner_dir, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    inputs = _lq_set(tmp_path / "in", 3)
    (tmp_path / "in" / "photo_00.json").write_text(json.dumps({"caption": "kept as it is"}))
    assert main([str(tmp_path / "in"), "--captions-only", "--captioner", str(captioner_dir), "--device", "cpu"]) == 0
    assert "2 done, 1 skipped" in capsys.readouterr().out
    assert json.loads((tmp_path / "in" / "photo_00.json").read_text()) == {"caption": "kept as it is"}
    assert all(set(json.loads(p.with_suffix(".json").read_text())) == {"caption"} for p in inputs[1:])
    assert not (tmp_path / "faithdiff-restored").exists()
    assert main([str(tmp_path / "in"), "--captions-only", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--captions-only has no captioner on cpu: name one with --captioner" in err
    assert err.count("--captions-only") == 1  # the refusal never suggests the flag the user just passed
