"""faithdiff-upscale --engine ray on a local Ray cluster of 2 CPUs with tiny components: the local engine's results,
resumption, a worker that dies, a corrupt image, and the mistakes refused before any model loads."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from tiny_models import tiny_captioner
from faithdiff_pipeline import loading
from faithdiff_pipeline.cli import main
from faithdiff_pipeline.image_io import result_text
from faithdiff_pipeline.application import restore_files
from faithdiff_pipeline.application.ray_engine import CRASH_ONCE_ENV

FAST = ["--steps", "2", "--tile-size", "64", "--device", "cpu", "--dtype", "float32"]


def require_ray():
    """Ray, or a skip where the [ray] extra is missing; under CI (which installs the test extra) a failure."""
    if os.environ.get("CI") and importlib.util.find_spec("ray") is None:
        pytest.fail("ray is not installed; CI must install the test extra, which has ray[data].")
    return pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = require_ray()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("captioner")
    model, processor = tiny_captioner()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _photos(folder: Path, count: int) -> list[Path]:
    """Small structured RGB images, each different."""
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:20, 0:24]
    paths = []
    for i in range(count):
        rgb = np.stack([(x * (10 + i)) % 256, (y * 12 + 40 * i) % 256, (x * y + i * 7) % 256], axis=-1)
        path = folder / f"photo_{i}.png"
        PIL.Image.fromarray(rgb.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _png_chunks(path: Path) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks (type, data), with the creation time in its ICC profile's header zeroed: LittleCMS stamps the
    sRGB profile with the second it was built, once per process (image_io.srgb_profile), so results written by two
    processes differ there and nowhere else."""
    data, chunks, offset = path.read_bytes(), [], 8
    while offset < len(data):
        (length,), kind = struct.unpack(">I", data[offset : offset + 4]), data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"iCCP":
            name, _, compressed = body.partition(b"\0")
            profile = zlib.decompress(compressed[1:])
            body = name + profile[:24] + bytes(12) + profile[36:]
        if kind == b"iTXt" and body.startswith(b"XML:com.adobe.xmp\0"):
            # Each result's provenance has its own document ids and time of writing.
            body = re.sub(rb"xmp\.[di]id:[0-9a-f-]{36}|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", b"", body)
        chunks.append((kind, body))
        offset += 12 + length
    return chunks


def _fast_options() -> dict:
    return {"steps": 2, "tile_size": 64, "device": "cpu", "dtype": "float32"}


def _results(folder: Path) -> dict[str, Path]:
    return {path.name: path for path in folder.iterdir()}


@pytest.mark.slow
def test_results_equal_the_local_engines_and_a_rerun_skips_them(
    ray_cluster, tiny_model_dir, captioner_dir, tmp_path, capsys
) -> None:
    """Captions first, then restoration, from and to URIs (file://, through pyarrow's filesystems as for s3://)."""
    for name in ("local", "ray"):
        _photos(tmp_path / name / "in", 3)
    options = [*FAST, "--model", str(tiny_model_dir), "--captioner", str(captioner_dir), "--compare", "--seed", "3"]
    # Ray gives a worker of one CPU one thread, and float sums on the CPU depend on the number of threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([str(tmp_path / "local" / "in"), "-o", str(tmp_path / "local" / "out"), *options]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    ray_in, ray_out = (tmp_path / "ray" / "in").as_uri(), (tmp_path / "ray" / "out").as_uri()
    assert main([ray_in, "-o", ray_out, *options, "--engine", "ray", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 done, 0 skipped (already restored), 0 failed" in out and "images per second" in out

    local, ray = _results(tmp_path / "local" / "out"), _results(tmp_path / "ray" / "out")
    assert sorted(ray) == sorted(local) and len(ray) == 6  # results and comparisons, no leftovers
    for name, path in local.items():
        assert _png_chunks(ray[name]) == _png_chunks(path), name
    sidecars = sorted((tmp_path / "local" / "in").glob("*.json"))
    assert len(sidecars) == 3
    for sidecar in sidecars:
        assert json.loads((tmp_path / "ray" / "in" / sidecar.name).read_text()) == json.loads(sidecar.read_text())
    with PIL.Image.open(ray["photo_0.png"]) as result:
        assert result.text["caption"] and json.loads(result.text["parameters"])["seed"] == 3

    written = {name: path.stat().st_mtime_ns for name, path in ray.items()}
    assert main([ray_in, "-o", ray_out, *options, "--engine", "ray"]) == 0
    assert "0 done, 3 skipped (already restored), 0 failed" in capsys.readouterr().out
    assert {name: path.stat().st_mtime_ns for name, path in _results(tmp_path / "ray" / "out").items()} == written


@pytest.mark.slow
def test_a_dying_worker_and_a_corrupt_image_do_not_stop_the_job(
    ray_cluster, tiny_model_dir, tmp_path, monkeypatch
) -> None:
    """A worker that kills its own process on its first image (the test hook) is restarted and that image retried;
    a corrupt image is reported with its reason; every other image is restored exactly once."""
    good = _photos(tmp_path / "in", 3)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))
    summary = restore_files(
        [tmp_path / "in"], tmp_path / "out", engine="ray", workers=1, model=str(tiny_model_dir), prompt="x", **_fast_options()
    )
    assert marker.exists()  # a worker did die
    assert sorted(summary.done) == [path.name for path in good] and not summary.skipped
    assert [name for name, _ in summary.failed] == ["broken.png"]
    assert summary.failed[0][1].startswith("not a readable image")
    assert summary.worker_deaths == 1
    report = summary.report()
    assert "3 done, 0 skipped (already restored), 1 failed" in report
    assert "1 worker process death(s): each worker was restarted" in report and "failed: broken.png: not a" in report
    results = sorted((tmp_path / "out").iterdir())  # no leftovers of the worker that died
    assert [path.name for path in results] == [path.name for path in good]
    assert all(result_text(path) is not None for path in results)


def test_without_ray_the_engine_is_a_one_line_error_before_any_model_loads(tmp_path, monkeypatch, capsys) -> None:
    _photos(tmp_path / "in", 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--engine", "ray", *FAST]) == 2
    err = capsys.readouterr().err
    install = "pip install 'faithdiff-pipeline[ray]'"
    assert err.strip().splitlines() == [
        f"faithdiff-upscale: error: --engine ray needs Ray Data, which is not installed: {install}"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--workers", "2"], "--workers needs --engine ray (the engine is local)"),
        (["--ray-address", "auto", "--gpus-per-worker", "1"], "--ray-address, --gpus-per-worker need --engine ray"),
        (["--engine", "ray", "--workers", "0"], "--workers must be at least 1, got 0"),
        (["--engine", "ray", "--gpus-per-worker", "-1"], "--gpus-per-worker must be a finite number >= 0, got -1.0"),
        (["--engine", "ray", "--device", "cuda:1"], "--device cuda:1 names one GPU"),
        (["--engine", "ray", "--captions-only"], "--captions-only runs on the local engine; drop --engine ray"),
        (["--engine", "ray", "--steps", "0"], "--steps must be a positive integer, got 0"),
    ],
)
def test_mistakes_are_one_line_errors_before_ray_starts(tmp_path, monkeypatch, capsys, extra, message) -> None:
    require_ray()
    _photos(tmp_path / "in", 1)
    monkeypatch.setattr("ray.init", lambda *a, **k: pytest.fail("Ray was started"))
    assert main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_missing_and_empty_uri_inputs_are_refused(tmp_path, monkeypatch, capsys) -> None:
    require_ray()
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr("ray.init", lambda *a, **k: pytest.fail("Ray was started"))
    for source, message in [
        ((tmp_path / "nothing.png").as_uri(), "does not exist"),
        ((tmp_path / "empty").as_uri(), "holds no images"),
    ]:
        assert main([source, "-o", (tmp_path / "out").as_uri(), "--engine", "ray"]) == 2
        assert message in capsys.readouterr().err


def test_a_foreign_file_in_a_remote_results_place_is_a_clash(tmp_path, monkeypatch, capsys) -> None:
    require_ray()
    _photos(tmp_path / "in", 1)
    (tmp_path / "out").mkdir()
    shutil.copy(tmp_path / "in" / "photo_0.png", tmp_path / "out" / "photo_0.png")  # not one of our results
    monkeypatch.setattr("ray.init", lambda *a, **k: pytest.fail("Ray was started"))
    assert main([(tmp_path / "in").as_uri(), "-o", (tmp_path / "out").as_uri(), "--engine", "ray"]) == 2
    assert "files that are not faithdiff results are in the way" in capsys.readouterr().err


def test_a_pool_the_cluster_cannot_hold_is_refused_before_any_work(ray_cluster, tmp_path, monkeypatch, capsys) -> None:
    """The README's GPU line on a cluster without GPUs (2 CPUs here): Ray Data would wait for ever for the actors."""
    _photos(tmp_path / "in", 1)
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    common = [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--engine", "ray", "--prompt", "x", *FAST]
    for extra, message in [
        (["--workers", "2", "--gpus-per-worker", "1"], "asks for more GPUs than the Ray cluster has (0)"),
        (["--workers", "3"], "--workers 3 is more than the Ray cluster's 2 CPUs"),
    ]:
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("address", ["127.0.0.1:9", "ray://127.0.0.1:9"])
def test_an_address_where_nothing_answers_fails_at_once(tmp_path, address) -> None:
    """Ray itself waits on such an address for many minutes (the ray:// form half a minute); the probe answers before
    Ray is asked. A fresh process, since this one runs a Ray cluster already."""
    require_ray()
    _photos(tmp_path / "in", 1)
    command = [sys.executable, "-m", "faithdiff_pipeline.cli", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
               "--engine", "ray", "--prompt", "x", "--ray-address", address]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"faithdiff-upscale: error: could not join the Ray cluster at {address!r}: nothing answers there "
        "(Connection refused); check the address (and RAY_ADDRESS), or leave it out to start a cluster on this machine"
    ]


@pytest.mark.slow
def test_fidelity_on_ray_equals_the_local_engines(ray_cluster, tiny_model_dir, tmp_path) -> None:
    _photos(tmp_path / "in", 1)
    options = dict(model=str(tiny_model_dir), prompt="x", fidelity=True, seeds=2, **_fast_options())
    local = restore_files([tmp_path / "in"], tmp_path / "local", progress=False, **options)
    pooled = restore_files([tmp_path / "in"], tmp_path / "ray", engine="ray", workers=1, **options)
    assert pooled.fidelity == local.fidelity and set(local.fidelity) == {"photo_0.png"}
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
    for name in ("photo_0_consistency_raw.png", "photo_0_spread_raw.png"):
        with PIL.Image.open(tmp_path / "ray" / name) as ray_map, PIL.Image.open(tmp_path / "local" / name) as ours:
            # The results are byte-equal; the maps' float sums may round apart in a worker with other thread counts.
            difference = np.abs(np.asarray(ray_map).astype(int) - np.asarray(ours).astype(int))
            assert difference.max() <= 1, (name, difference.max())
