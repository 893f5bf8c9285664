"""The evaluation harness: PSNR/SSIM against scikit-image, synthetic sets, and `faithdiff-eval` end to end."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFilter
import PIL.ImageOps
import pytest
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from shared_data import shared_path

from tiny_models import tiny_components
from faithdiff_pipeline import FaithDiffSDXLPipeline
from faithdiff_pipeline.degradations import get_preset
from faithdiff_pipeline.evaluation import MetricUnavailableError, load_metric, make_synthetic_set, psnr, read_csv, ssim
from faithdiff_pipeline.evaluation.datasets import pair_folders, read_tensor
from faithdiff_pipeline import loading
from faithdiff_pipeline.evaluation.cli import build_parser as eval_parser
from faithdiff_pipeline.evaluation.cli import device_and_dtype
from faithdiff_pipeline.evaluation.cli import main as eval_main
from faithdiff_pipeline.evaluation.metrics import default_metric_names

SAMPLES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
EXTRA = 'pip install "faithdiff-pipeline[eval]"'


# ---------------------------------------------------------------------------------------------------------------------
# PSNR and SSIM against scikit-image, on real photos with known degradations


def _blur(image: PIL.Image.Image) -> PIL.Image.Image:
    return image.filter(PIL.ImageFilter.GaussianBlur(2))


def _noise(image: PIL.Image.Image) -> PIL.Image.Image:
    array = np.asarray(image, dtype=np.float64)
    noisy = array + np.random.default_rng(0).normal(0.0, 15.0, array.shape)
    return PIL.Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def _jpeg(image: PIL.Image.Image) -> PIL.Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=30)
    return PIL.Image.open(buffer).convert("RGB")


@pytest.fixture(scope="module")
def degraded_photos() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, HQ, degraded) as float64 [H, W, 3] arrays in [0, 1], for every sample photo and degradation."""
    folder = shared_path("samples")
    cases = []
    for name in SAMPLES:
        with PIL.Image.open(folder / name) as opened:
            hq = opened.convert("RGB")
        for degrade in (_blur, _noise, _jpeg):
            cases.append((f"{name}/{degrade.__name__}", np.asarray(hq) / 255.0, np.asarray(degrade(hq)) / 255.0))
    return cases


def _batch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]


def _luma(array: np.ndarray) -> np.ndarray:
    """scikit-image's BT.601 Y (in [16, 235]) scaled to [0, 1]."""
    return rgb2ycbcr(array)[..., 0] / 255.0


def _crop(array: np.ndarray, border: int) -> np.ndarray:
    return array[border:-border, border:-border] if border else array


def _skimage_ssim(restored: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """scikit-image's SSIM with pyiqa's settings, and the same with the contrast-structure term clipped at 0 as pyiqa
    does: the luminance term is positive, so that is the SSIM map clipped at 0, averaged where skimage averages it
    (5 px in from each edge, i.e. where the 11-px window lies inside the image)."""
    channel_axis = -1 if restored.ndim == 3 else None
    value, ssim_map = structural_similarity(
        restored,
        reference,
        data_range=1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        channel_axis=channel_axis,
        full=True,
    )
    return value, float(np.clip(ssim_map[5:-5, 5:-5], 0, None).mean())


@pytest.mark.parametrize("crop_border", [0, 4])
@pytest.mark.parametrize("y_channel", [False, True])
def test_psnr_matches_scikit_image(degraded_photos, y_channel, crop_border) -> None:
    for label, hq, degraded in degraded_photos:
        ours = psnr(_batch(degraded), _batch(hq), y_channel=y_channel, crop_border=crop_border).item()
        if y_channel:
            hq, degraded = _luma(hq), _luma(degraded)
        expected = peak_signal_noise_ratio(_crop(hq, crop_border), _crop(degraded, crop_border), data_range=1)
        assert abs(ours - expected) < 1e-4, label


@pytest.mark.parametrize("y_channel, crop_border", [(False, 0), (True, 4)])
def test_ssim_matches_scikit_image(degraded_photos, y_channel, crop_border) -> None:
    for label, hq, degraded in degraded_photos:
        ours = ssim(_batch(degraded), _batch(hq), y_channel=y_channel, crop_border=crop_border).item()
        if y_channel:
            # pyiqa measures SSIM on 8-bit levels: the luma is rounded as MATLAB's rgb2ycbcr does on uint8 images.
            hq, degraded = np.round(_luma(hq) * 255) / 255, np.round(_luma(degraded) * 255) / 255
        plain, clipped = _skimage_ssim(_crop(degraded, crop_border), _crop(hq, crop_border))
        assert abs(ours - clipped) < 1e-4, label
        # skimage's own value agrees too, unless clipping the negative local scores moves it by more than that.
        assert abs(ours - plain) < 1e-4 or clipped - plain >= 1e-4, label


def test_metrics_of_identical_images_and_bad_arguments() -> None:
    image = torch.rand(2, 3, 24, 20)
    assert torch.isinf(psnr(image, image)).all()
    assert torch.allclose(ssim(image, image), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"`restored` \(2, 3, 24, 20\) and `reference` \(2, 3, 24, 18\)"):
        psnr(image, image[..., :18])
    with pytest.raises(ValueError, match="`crop_border` must be an integer >= 0"):
        ssim(image, image, crop_border=10)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(image, image, crop_border=5)
    with pytest.raises(ValueError, match=r"RGB batch \[B, 3, H, W\]"):
        psnr(image[:, :1], image[:, :1])


# ---------------------------------------------------------------------------------------------------------------------
# pyiqa metrics are optional


def test_pyiqa_metrics_without_pyiqa_name_the_extra_and_the_metric(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # makes `import pyiqa` fail
    with pytest.raises(MetricUnavailableError) as caught:
        load_metric("lpips")
    assert EXTRA in str(caught.value) and "'lpips'" in str(caught.value)
    names, note = default_metric_names()
    assert names == ["psnr", "ssim", "psnr-y", "ssim-y", "lr-psnr", "lr-ssim"]
    assert EXTRA in note and "musiq" in note

    hq, lq = tmp_path / "hq", tmp_path / "lq"
    _write_pairs(hq, lq, {"a": _gradient(32, 24)})
    assert (
        eval_main(["--hq", str(hq), "--lq", str(lq), "--out", str(tmp_path / "out"), "--metrics", "psnr,maniqa"]) == 2
    )
    error = _one_error_line(capsys)
    assert EXTRA in error and "'maniqa'" in error


def test_pyiqa_metric_whose_weights_cannot_be_loaded(monkeypatch) -> None:
    class OfflinePyiqa:
        @staticmethod
        def create_metric(name, **kwargs):
            raise ConnectionError(f"cannot download the weights of {name}")

    monkeypatch.setitem(sys.modules, "pyiqa", OfflinePyiqa)
    with pytest.raises(MetricUnavailableError) as caught:
        load_metric("dists")
    assert EXTRA in str(caught.value) and "'dists'" in str(caught.value) and "cannot download" in str(caught.value)


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic sets


def _gradient(width: int, height: int, phase: int = 0) -> PIL.Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 7 + phase) % 256, (y * 9) % 256, ((x * y) // 3 + phase) % 256], axis=-1).astype(np.uint8)
    return PIL.Image.fromarray(rgb)


@pytest.fixture
def hq_folder(tmp_path) -> Path:
    """Three HQ images whose sizes are not multiples of 4, one of them a JPEG."""
    folder = tmp_path / "sources"
    folder.mkdir()
    _gradient(70, 45).save(folder / "a.png")
    _gradient(50, 66, phase=40).save(folder / "b.png")
    _gradient(64, 64, phase=90).save(folder / "c.jpg", quality=95)
    return folder


def test_synthetic_sets_are_identical_from_the_same_seed(hq_folder, tmp_path) -> None:
    first = make_synthetic_set(hq_folder, tmp_path / "one", "dasr-level2", seed=7, progress=False)
    second = make_synthetic_set(hq_folder, tmp_path / "two", "dasr-level2", seed=7, progress=False)
    assert [p.name for p in first.pairs] == ["a", "b", "c"] and first.scale == get_preset("dasr-level2").scale == 4
    for one, two in zip(first.pairs, second.pairs):
        assert one.lq.read_bytes() == two.lq.read_bytes() and one.hq.read_bytes() == two.hq.read_bytes()

    # Each image's degradation depends on its name and the seed only, not on the other images of the folder.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "b.png").write_bytes((hq_folder / "b.png").read_bytes())
    single = make_synthetic_set(alone, tmp_path / "three", "dasr-level2", seed=7, progress=False)
    assert single.pairs[0].lq.read_bytes() == first.pairs[1].lq.read_bytes()

    other = make_synthetic_set(hq_folder, tmp_path / "four", "dasr-level2", seed=8, progress=False)
    assert other.pairs[0].lq.read_bytes() != first.pairs[0].lq.read_bytes()


def test_synthetic_set_crops_top_left_and_records_its_making(hq_folder, tmp_path) -> None:
    dataset = make_synthetic_set(hq_folder, tmp_path / "set", "dasr-level1", seed=3, progress=False)
    a = dataset.pairs[0]
    assert a.hq_size == (68, 44) and a.lq_size == (17, 11)
    source = np.asarray(PIL.Image.open(hq_folder / "a.png").convert("RGB"))
    assert np.array_equal(np.asarray(PIL.Image.open(a.hq)), source[:44, :68])

    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert manifest["preset"] == "dasr-level1" and manifest["seed"] == 3 and manifest["scale"] == 4
    assert manifest["config"] == json.loads(json.dumps(get_preset("dasr-level1").to_dict()))
    assert set(manifest["versions"]) >= {"faithdiff_pipeline", "torch"}
    assert [image["name"] for image in manifest["images"]] == ["a", "b", "c"]


def test_synthetic_set_is_completed_but_never_mixed(hq_folder, tmp_path) -> None:
    set_dir = tmp_path / "set"
    dataset = make_synthetic_set(hq_folder, set_dir, "dasr-level1", seed=0, progress=False)
    original = dataset.pairs[2].lq.read_bytes()
    dataset.pairs[2].lq.unlink()  # as after an interruption
    make_synthetic_set(hq_folder, set_dir, "dasr-level1", seed=0, progress=False)
    assert dataset.pairs[2].lq.read_bytes() == original
    with pytest.raises(ValueError, match="holds a set made otherwise .*preset, config"):
        make_synthetic_set(hq_folder, set_dir, "dasr-level3", seed=0, progress=False)
    with pytest.raises(ValueError, match="`preset` 'dasr-level9' is unknown; expected one of .*dasr-level1"):
        make_synthetic_set(hq_folder, tmp_path / "other", "dasr-level9", progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# faithdiff-eval end to end


def _write_pairs(hq: Path, lq: Path, images: dict[str, PIL.Image.Image], scale: int = 2) -> None:
    hq.mkdir(parents=True, exist_ok=True)
    lq.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(hq / f"{name}.png")
        image.resize((image.width // scale, image.height // scale), PIL.Image.BICUBIC).save(lq / f"{name}.png")


@pytest.fixture
def photo_set(tmp_path) -> tuple[Path, Path]:
    """Three sample photos, 64 x 64 central crops as HQ and their bicubic x0.5 as LQ."""
    samples = shared_path("samples")
    images = {}
    for name in SAMPLES[:3]:
        with PIL.Image.open(samples / name) as opened:
            photo = opened.convert("RGB")
        left, top = photo.width // 2 - 32, photo.height // 2 - 32
        images[Path(name).stem] = photo.crop((left, top, left + 64, top + 64))
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    _write_pairs(hq, lq, images)
    return hq, lq


@pytest.fixture
def tiny_pipeline_dir(tmp_path) -> Path:
    folder = tmp_path / "tiny-faithdiff"
    FaithDiffSDXLPipeline(**tiny_components()).save_pretrained(folder)
    return folder


@pytest.fixture
def pipeline_calls(monkeypatch) -> list[int]:
    """Counts the FaithDiff pipeline calls made by the CLI."""
    calls = []
    original = FaithDiffSDXLPipeline.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FaithDiffSDXLPipeline, "__call__", counted)
    return calls


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("faithdiff-eval: error: ") and "Traceback" not in lines[0]
    return lines[0]


def test_eval_cli_end_to_end_with_lanczos_and_faithdiff(
    photo_set, tiny_pipeline_dir, pipeline_calls, tmp_path
) -> None:
    hq, lq = photo_set
    out = tmp_path / "out"
    argv = [
        "--hq",
        str(hq),
        "--lq",
        str(lq),
        "--out",
        str(out),
        "--method",
        "lanczos",
        "--method",
        f"faithdiff={tiny_pipeline_dir}",
        "--steps",
        "2",
        "--tile-size",
        "64",
        "--sample-seed",
        "5",
        "--metrics",
        "psnr,ssim,psnr-y,ssim-y",
        "--device",
        "cpu",
    ]
    assert eval_main(argv) == 0
    assert len(pipeline_calls) == 3
    for name in ("metrics.csv", "table.md", "metrics.png", "crops.png"):
        assert (out / name).is_file(), name

    rows = read_csv(out / "metrics.csv")
    assert [(r["method"], r["image"]) for r in rows] == [
        (method, image) for method in ("lanczos", "faithdiff") for image in ("astronaut", "chelsea", "coffee")
    ]
    # The scores are those of the saved images, recomputed here independently with scikit-image.
    for row in rows:
        restored = np.asarray(PIL.Image.open(out / "results" / row["method"] / f"{row['image']}.png")) / 255.0
        reference = np.asarray(PIL.Image.open(hq / f"{row['image']}.png")) / 255.0
        assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(reference, restored, data_range=1), abs=1e-6)
        assert row["psnr-y"] == pytest.approx(
            peak_signal_noise_ratio(_luma(reference), _luma(restored), data_range=1), abs=1e-6
        )
    # The baseline is LANCZOS; the FaithDiff result is what the pipeline gives with the requested settings.
    lq_image = PIL.Image.open(lq / "chelsea.png").convert("RGB")
    assert np.array_equal(
        np.asarray(PIL.Image.open(out / "results" / "lanczos" / "chelsea.png")),
        np.asarray(lq_image.resize((64, 64), PIL.Image.LANCZOS)),
    )
    pipe = FaithDiffSDXLPipeline.from_pretrained(tiny_pipeline_dir)
    direct = pipe(
        lq_image, prompt="", upscale=2, num_inference_steps=2, tile_size=64, generator=torch.Generator().manual_seed(5)
    ).images[0]
    assert np.array_equal(
        np.asarray(PIL.Image.open(out / "results" / "faithdiff" / "chelsea.png")), np.asarray(direct)
    )

    table = (out / "table.md").read_text()
    assert "| Method | PSNR ↑ | SSIM ↑ | PSNR-Y ↑ | SSIM-Y ↑ |" in table
    for method in ("lanczos", "faithdiff"):
        scores = [r for r in rows if r["method"] == method]
        line = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        cells = [cell.strip("* ") for cell in line.strip("|").split("|")[1:]]
        assert float(cells[0]) == pytest.approx(np.mean([r["psnr"] for r in scores]), abs=0.005)
        assert float(cells[1]) == pytest.approx(np.mean([r["ssim"] for r in scores]), abs=0.00005)
    with PIL.Image.open(out / "crops.png") as grid:  # 3 images x (LQ | lanczos | faithdiff | HQ), 256-px tiles
        assert grid.size == (120 + 4 * 256, 18 + 3 * 256)
    with PIL.Image.open(out / "metrics.png") as plot:
        assert plot.format == "PNG"

    # A second run reuses the saved results: no pipeline call, no file rewritten, the same scores.
    stamps = {path: path.stat().st_mtime_ns for path in (out / "results").rglob("*.png")}
    calls = len(pipeline_calls)
    assert eval_main(argv) == 0
    assert len(pipeline_calls) == calls
    assert stamps == {path: path.stat().st_mtime_ns for path in (out / "results").rglob("*.png")}
    assert read_csv(out / "metrics.csv") == rows

    # Other sampling settings do not mix with the saved results.
    assert eval_main([*argv, "--steps", "3"]) == 2


def test_eval_cli_builds_a_synthetic_set_and_scores_other_methods(hq_folder, tmp_path, capsys) -> None:
    set_dir, out = tmp_path / "set", tmp_path / "out"
    base = ["--make-set", str(hq_folder), "--preset", "dasr-level1", "--seed", "0", "--set-dir", str(set_dir)]
    assert eval_main([*base, "--out", str(out), "--metrics", "psnr,ssim"]) == 0
    assert (set_dir / "manifest.json").is_file() and (out / "results" / "lanczos" / "a.png").is_file()
    # Results of another method, paired by name: here the HQ images themselves, the best possible scores.
    assert (
        eval_main(
            [
                *base,
                "--out",
                str(out),
                "--metrics",
                "ssim",
                "--method",
                "lanczos",
                "--method",
                f"oracle={set_dir / 'hq'}",
            ]
        )
        == 0
    )
    rows = read_csv(out / "metrics.csv")
    assert [r["ssim"] for r in rows if r["method"] == "oracle"] == [1.0, 1.0, 1.0]
    assert "| oracle | **1.0000** |" in (out / "table.md").read_text()


def test_a_failing_image_is_reported_and_the_run_goes_on(tmp_path, capsys) -> None:
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    _write_pairs(hq, lq, {"a": _gradient(32, 24), "b": _gradient(32, 24, 50), "c": _gradient(32, 24, 99)})
    (lq / "b.png").write_bytes((lq / "b.png").read_bytes()[:60])  # the header survives, the pixels do not
    out = tmp_path / "out"
    assert eval_main(["--hq", str(hq), "--lq", str(lq), "--out", str(out), "--metrics", "psnr"]) == 1
    assert "lanczos/b" in capsys.readouterr().err
    assert [r["image"] for r in read_csv(out / "metrics.csv")] == ["a", "c"]
    assert (out / "table.md").is_file() and (out / "crops.png").is_file()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("size", r"HQ image 'b' is 32x24 but its LQ image is 15x12: HQ must be 2 x LQ = 30x24"),
        ("missing", r"LQ folder .* lacks 2 image\(s\) of the HQ folder: b, c"),
        ("empty", r"LQ folder .* holds no images"),
        ("method", r"`--method` 'realesrgan' is not a method"),
        ("metric", r"`--metrics` names unknown metric\(s\) fid"),
        ("preset", r"--preset 'dasr-level4' is unknown"),
        ("results", r"result folder .* of method 'supir' lacks 1 image\(s\) of the set: c"),
    ],
)
def test_user_mistakes_give_one_clear_line(tmp_path, capsys, case, expected) -> None:
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    _write_pairs(hq, lq, {"a": _gradient(32, 24), "b": _gradient(32, 24, 50), "c": _gradient(32, 24, 99)})
    argv = ["--hq", str(hq), "--lq", str(lq), "--out", str(tmp_path / "out"), "--metrics", "psnr"]
    if case == "size":
        PIL.Image.open(lq / "b.png").resize((15, 12)).save(lq / "b.png")
    elif case == "missing":
        (lq / "b.png").unlink()
        (lq / "c.png").unlink()
    elif case == "empty":
        for path in lq.iterdir():
            path.unlink()
    elif case == "method":
        argv += ["--method", "realesrgan"]
    elif case == "metric":
        argv[-1] = "psnr,fid"
    elif case == "preset":
        argv = ["--make-set", str(hq), "--preset", "dasr-level4", "--set-dir", str(tmp_path / "set")]
    elif case == "results":
        results = tmp_path / "supir"
        results.mkdir()
        for name in ("a", "b"):
            (results / f"{name}.png").write_bytes((hq / f"{name}.png").read_bytes())
        argv += ["--method", f"supir={results}"]
    assert eval_main(argv) == 2
    assert re.search(expected, _one_error_line(capsys))


def test_faithdiff_prompts_from_caption_sidecars(photo_set, tiny_pipeline_dir, tmp_path, monkeypatch, capsys) -> None:
    """--captions sidecar: each LQ image's sidecar (the release's format, cleaned on reading) is its prompt; an image
    without one is reported as failed and the others go on."""
    from faithdiff_pipeline.captioning import write_caption

    hq, lq = photo_set
    write_caption(lq / "astronaut.png", "The image features an astronaut. She smiles. Flags.")
    write_caption(lq / "chelsea.png", "The image shows a cat with green eyes.")
    prompts = []
    original = FaithDiffSDXLPipeline.__call__
    monkeypatch.setattr(
        FaithDiffSDXLPipeline, "__call__", lambda self, *a, **k: prompts.append(k["prompt"]) or original(self, *a, **k)
    )
    argv = [
        "--hq",
        str(hq),
        "--lq",
        str(lq),
        "--out",
        str(tmp_path / "out"),
        "--method",
        f"faithdiff={tiny_pipeline_dir}",
        "--captions",
        "sidecar",
        "--steps",
        "1",
        "--tile-size",
        "64",
        "--metrics",
        "psnr",
        "--device",
        "cpu",
    ]
    assert eval_main(argv) == 1
    assert prompts == ["An astronaut. She smiles.", "A cat with green eyes.."]
    captured = capsys.readouterr()
    assert "no caption sidecar coffee.json beside the LQ image" in captured.out + captured.err
    assert eval_main([*argv, "--prompt", "x"]) == 2
    assert "conflicts with --captions sidecar" in _one_error_line(capsys)


# ---------------------------------------------------------------------------------------------------------------------
# Device, dtype and weights: chosen by faithdiff_pipeline.loading, as faithdiff-upscale and the demo choose them


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"), [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]
)
@pytest.mark.parametrize("dtype", [[], ["--dtype", "auto"], ["--dtype", "bfloat16"], ["--dtype", "float32"]])
def test_eval_chooses_device_and_dtype_as_loading_does(monkeypatch, cuda, mps, expected, dtype) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    for device in ([], ["--device", "auto"]):
        args = eval_parser().parse_args([*device, *dtype])
        chosen_device, chosen_dtype = device_and_dtype(args.device, args.dtype)
        assert chosen_device == loading.resolve_device("auto") == torch.device(expected)
        assert chosen_dtype == loading.resolve_dtype(dtype[-1] if dtype else "auto", chosen_device)
        if dtype in ([], ["--dtype", "auto"]):
            assert chosen_dtype == (torch.float32 if expected == "cpu" else torch.float16)


@pytest.mark.parametrize(
    ("cuda", "mps", "device", "message"),
    [
        (False, True, "cuda", "--device 'cuda' asks for a CUDA GPU, but torch sees none"),
        (True, False, "mps", "--device 'mps' asks for Apple's MPS, which this machine lacks"),
        (True, True, "gpu0", "--device 'gpu0' is not a torch device"),
    ],
)
def test_eval_refuses_a_device_it_lacks_in_one_line(tmp_path, monkeypatch, capsys, cuda, mps, device, message) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    _write_pairs(hq, lq, {"a": _gradient(32, 24)})
    argv = ["--hq", str(hq), "--lq", str(lq), "--out", str(tmp_path / "out"), "--metrics", "psnr", "--device", device]
    assert eval_main(argv) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_eval_loads_faithdiff_through_loading_on_the_fallback_device(
    tiny_pipeline_dir, tmp_path, monkeypatch
) -> None:
    """On a machine with MPS and no CUDA, the pipeline is asked of loading.load_pipeline for MPS in float16, as
    faithdiff-upscale would ask (it is then run on the CPU here, which has no MPS)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    asked = []
    load_pipeline = loading.load_pipeline

    def spy(model, device, dtype, **kwargs):
        asked.append((model, device, dtype, kwargs))
        return load_pipeline(model, torch.device("cpu"), torch.float32, **kwargs)

    monkeypatch.setattr(loading, "load_pipeline", spy)
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    _write_pairs(hq, lq, {"a": _gradient(32, 32)})
    out = tmp_path / "out"
    argv = ["--hq", str(hq), "--lq", str(lq), "--out", str(out), "--metrics", "psnr", "--steps", "1"]
    assert eval_main([*argv, "--tile-size", "64", "--method", f"faithdiff={tiny_pipeline_dir}"]) == 0
    assert asked == [(str(tiny_pipeline_dir), torch.device("mps"), torch.float16, {"variant": "auto"})]
    settings = json.loads((out / "results" / "faithdiff" / "settings.json").read_text())
    assert (settings["dtype"], settings["variant"]) == ("float16", None)


@pytest.fixture
def two_variant_dir(tmp_path) -> Path:
    """A pipeline folder with full files (components of seed 0) and ``fp16`` files (other weights, seed 1), so that
    which files were loaded shows in the result."""
    folder = tmp_path / "two-variants"
    FaithDiffSDXLPipeline(**tiny_components(seed=0)).save_pretrained(folder)
    FaithDiffSDXLPipeline(**tiny_components(seed=1)).save_pretrained(folder, variant="fp16")
    return folder


@pytest.mark.parametrize(
    ("flags", "variant", "dtype"),
    [
        (["--dtype", "float32"], None, torch.float32),  # full precision: the full files
        (["--dtype", "float32", "--variant", "fp16"], "fp16", torch.float32),  # an explicit --variant wins
        (["--dtype", "bfloat16"], "fp16", torch.bfloat16),  # both half types: the fp16 files, as loading decides
    ],
)
def test_eval_loads_the_variant_that_loading_picks_unless_variant_is_given(
    two_variant_dir, tmp_path, flags, variant, dtype
) -> None:
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    _write_pairs(hq, lq, {"a": _gradient(32, 32)})
    out = tmp_path / "out"
    argv = ["--hq", str(hq), "--lq", str(lq), "--out", str(out), "--metrics", "psnr", "--steps", "1", "--device", "cpu"]
    assert eval_main([*argv, "--tile-size", "64", "--method", f"faithdiff={two_variant_dir}", *flags]) == 0
    kwargs = {"variant": variant} if variant else {}
    pipe = FaithDiffSDXLPipeline.from_pretrained(two_variant_dir, dtype=dtype, **kwargs)
    expected = pipe(
        PIL.Image.open(lq / "a.png").convert("RGB"),
        prompt="",
        upscale=2,
        num_inference_steps=1,
        tile_size=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out / "results" / "faithdiff" / "a.png")), np.asarray(expected))


def test_eval_refuses_a_faithdiff_folder_that_is_no_pipeline_before_loading_metrics(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(
        "faithdiff_pipeline.evaluation.metrics.load_metric", lambda *a, **k: pytest.fail("a metric loaded")
    )
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    _write_pairs(hq, lq, {"a": _gradient(32, 24)})
    (tmp_path / "empty").mkdir()
    argv = ["--hq", str(hq), "--lq", str(lq), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert eval_main([*argv, "--method", f"faithdiff={tmp_path / 'empty'}"]) == 2
    assert "`--method faithdiff`" in (line := _one_error_line(capsys)) and "has no model_index.json" in line
    assert eval_main([*argv, "--method", f"faithdiff={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in _one_error_line(capsys)


# ---------------------------------------------------------------------------------------------------------------------
# Photos are read as image_io reads them: upright by EXIF, 16-bit levels kept; only image_io opens or saves images

REPO = Path(__file__).resolve().parents[1]


def _turned_jpeg(path: Path, width: int = 48, height: int = 32) -> np.ndarray:
    """A JPEG stored ``width`` x ``height`` with EXIF orientation 6 (shown turned 90 degrees clockwise); returns the
    upright RGB pixels, as Pillow's ``exif_transpose`` shows them."""
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    _gradient(width, height).save(path, quality=95, exif=exif)
    with PIL.Image.open(path) as opened:
        return np.asarray(PIL.ImageOps.exif_transpose(opened).convert("RGB"))


def _grey16(path: Path, width: int = 32, height: int = 24, step: int = 1) -> float:
    """A 16-bit greyscale PNG of a ramp (every ``step``-th sample of the full-size ramp); returns its mean level in
    [0, 1]."""
    y, x = np.mgrid[0:height:step, 0:width:step]
    levels = (12000 + 700 * x + 900 * y).astype(np.uint16)
    PIL.Image.fromarray(levels).save(path)
    return float(levels.mean()) / 65535.0


def test_eval_reads_exif_turned_and_16_bit_photos(tmp_path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    upright = _turned_jpeg(photos / "turned.jpg")
    level = _grey16(photos / "grey16.png")
    assert upright.shape == (48, 32, 3)

    turned = read_tensor(photos / "turned.jpg")
    assert turned.shape == (1, 3, 48, 32) and turned.dtype == torch.float32
    assert torch.equal((turned * 255).round().to(torch.uint8), torch.from_numpy(upright.copy()).permute(2, 0, 1)[None])
    grey = read_tensor(photos / "grey16.png")
    assert grey.shape == (1, 3, 24, 32) and abs(grey.mean().item() - level) < 1 / 255  # not washed out to white
    assert torch.equal(grey[:, 0], grey[:, 2])

    # A synthetic set is made from the upright photo, at the 16-bit photo's levels.
    made = make_synthetic_set(photos, tmp_path / "set", "dasr-level1", seed=0, progress=False)
    pairs = {pair.name: pair for pair in made.pairs}
    assert pairs["turned"].hq_size == (32, 48) and pairs["grey16"].hq_size == (32, 24)
    assert np.array_equal(np.asarray(PIL.Image.open(pairs["turned"].hq)), upright)
    assert abs(np.asarray(PIL.Image.open(pairs["grey16"].hq)).mean() / 255 - level) < 1 / 255


def test_eval_cli_pairs_scores_and_restores_turned_and_16_bit_photos(tmp_path) -> None:
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    hq.mkdir()
    lq.mkdir()
    upright = _turned_jpeg(hq / "turned.jpg")  # stored 48 x 32, upright 32 x 48
    PIL.Image.fromarray(upright).resize((16, 24), PIL.Image.BICUBIC).save(lq / "turned.png")
    _grey16(hq / "grey16.png")
    lq_level = _grey16(lq / "grey16.png", step=2)  # 16 x 12, 16-bit too
    dataset = pair_folders(hq, lq)
    assert [(p.name, p.hq_size, p.lq_size) for p in dataset.pairs] == [
        ("grey16", (32, 24), (16, 12)),
        ("turned", (32, 48), (16, 24)),
    ]

    out = tmp_path / "out"
    assert eval_main(["--hq", str(hq), "--lq", str(lq), "--out", str(out), "--metrics", "psnr"]) == 0
    rows = {row["image"]: row for row in read_csv(out / "metrics.csv")}
    # Read as white (the old 8-bit conversion), both would be identical: an infinite PSNR.
    assert 20 < rows["grey16"]["psnr"] < float("inf") and 15 < rows["turned"]["psnr"] < float("inf")
    with PIL.Image.open(out / "results" / "lanczos" / "grey16.png") as result:
        assert (result.mode, result.size) == ("RGB", (32, 24))
        assert abs(np.asarray(result).mean() / 255 - lq_level) < 1 / 255
    with PIL.Image.open(out / "results" / "lanczos" / "turned.png") as result:
        assert (result.mode, result.size) == ("RGB", (32, 48))
    assert (out / "crops.png").is_file() and not list(out.rglob("*.faithdiff-tmp"))


def test_only_image_io_opens_or_saves_image_files() -> None:
    """What ``grep -rn "PIL.Image.open\\|\\.save(" src examples benchmarks`` finds, less image_io itself, model
    and checkpoint saves, model cards (README.md text) and docstring examples."""
    pattern = re.compile(r"Image\.open\(|\.save\(")
    allowed = re.compile(r"save_pretrained|torch\.save\(|self\.save\(|card\.save\(|^\s*>>> ")
    found = []
    for folder in ("src", "examples", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "image_io.py":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if pattern.search(line) and not allowed.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "image files read or written outside image_io:\n" + "\n".join(found)

