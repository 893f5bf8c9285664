"""Training: data preparation, the datasets, the loss, both stages on tiny components, checkpoints and resumption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from shared_data import shared_path

from tiny_models import structured_photo, tiny_components
from faithdiff_pipeline import FaithDiffLQEncoder, FaithDiffSDXLPipeline
from faithdiff_pipeline.captioning import write_caption
from faithdiff_pipeline.degradations import DegradationConfig
from faithdiff_pipeline.training import (
    DegradingDataset,
    PreparedPairsDataset,
    TrainingConfig,
    TrainingSetupError,
    epsilon_loss,
    noise_latents,
    read_manifest,
)
from faithdiff_pipeline.training.data import degraded_crop, load_rgb, micro_conditioning, to_model_range
from faithdiff_pipeline.training.prepare import main as prepare_main
from faithdiff_pipeline.training.prepare import prepare_training_set
from faithdiff_pipeline.training.stages import STAGE_RECIPES, parameter_groups, training_module
from faithdiff_pipeline.training.train import main as train_main
from faithdiff_pipeline.training.train import train

HQ = 64  # tiny HQ crops: 16 px LQ, 8 x 8 latents


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos") / "photos"
    folder.mkdir()
    for i in range(4):
        structured_photo(96 + 8 * i, 80, seed=i).save(folder / f"photo{i}.png")
    return folder


@pytest.fixture(scope="module")
def manifest(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("set")
    prepare_training_set([photos], output, hq_size=HQ, captions="none", progress=False)
    return output / "manifest.jsonl"


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny components saved as an SDXL diffusers folder (no FaithDiff parts)."""
    folder = tmp_path_factory.mktemp("sdxl")
    components = tiny_components()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        components[name].save_pretrained(folder / name)
    return folder


def _settings(manifest: Path | None, output: Path, **overrides) -> dict:
    settings = dict(
        train_manifest=str(manifest) if manifest else None,
        output_dir=str(output),
        train_batch_size=1,
        effective_batch_size=2,
        max_train_steps=2,
        checkpointing_steps=2,
        validation_steps=0,
        learning_rate=1e-3,
        lq_encoder_learning_rate=1e-3,
        lr_warmup_steps=1,
        report_to="none",
        dataloader_num_workers=0,
        mixed_precision="no",
        vae=None,  # the tiny model's own VAE, not the release's default from the Hub
        seed=7,
    )
    settings.update(overrides)
    return settings


@pytest.fixture(scope="module")
def stage1_run(manifest: Path, sdxl_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage 1 through the command line and a YAML file: 2 steps, validation at step 2. Returns the output folder."""
    import yaml

    output = tmp_path_factory.mktemp("stage1")
    config = {
        **_settings(manifest, output, validation_steps=2, num_validation_images=1, validation_inference_steps=2),
        "pretrained_model": str(sdxl_base),
    }
    (output / "train.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert train_main(["--stage", "1", "--config", str(output / "train.yaml"), "--report-to", "none"]) == 0
    return output


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next(folder.glob("*.safetensors")))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------------------------- data preparation
def test_prepare_data_crops_manifest_skips_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    samples = shared_path("samples")
    extra = tmp_path / "extra"
    extra.mkdir()
    structured_photo(40, 40, seed=9).save(extra / "small.png")
    (extra / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    output = tmp_path / "set"
    args = [str(samples), str(extra), "-o", str(output), "--hq-size", "128", "--crops-per-image", "2", "--no-progress"]

    # Without a caption source the command refuses, in one line naming the options, before writing anything.
    assert prepare_main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("faithdiff-prepare-data: error:") and "\n" not in error
    assert all(option in error for option in ("--captioner MODEL_ID", "--sidecar-captions", "--captioner none"))
    assert not output.exists()

    args += ["--captioner", "none"]
    assert prepare_main(args) == 0
    report = capsys.readouterr().out
    assert "8 crop(s) written" in report and "1 image(s) smaller than 128 px skipped" in report
    assert "1 unreadable" in report and "broken.png" in report
    assert "4 image(s) without a caption" in report

    records = read_manifest(output / "manifest.jsonl")
    assert len(records) == 8 and {Path(r.source).name for r in records} == {
        "astronaut.png",
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
    }
    for record in records:
        hq, lq = load_rgb(output / record.hq), load_rgb(output / record.lq)
        assert hq.size == (128, 128) and lq.size == (32, 32) and record.scale == 4 and record.caption == ""
        left, top, right, bottom = record.crop_box
        assert left % 4 == 0 and top % 4 == 0 and (right - left, bottom - top) == (128, 128)
        assert right <= record.source_size[0] and bottom <= record.source_size[1]
        # The HQ crop is the source's pixels at the box; the record's seed regenerates the same LQ crop.
        source = load_rgb(record.source)
        assert np.array_equal(np.asarray(hq), np.asarray(source.crop(record.crop_box)))
        _, again, box = degraded_crop(source, 128, DegradationConfig(), torch.Generator().manual_seed(record.seed))
        assert box == record.crop_box and np.array_equal(np.asarray(again), np.asarray(lq))

    # Interrupt: one crop lost, a half-written manifest line. A re-run makes only that crop, identically.
    lost = output / records[3].hq
    expected = lost.read_bytes()
    lost.unlink()
    with open(output / "manifest.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"hq": "hq/samp')
    untouched = output / records[0].lq
    stamp = untouched.stat().st_mtime_ns
    summary = prepare_training_set(
        [samples, extra], output, hq_size=128, crops_per_image=2, captions="none", progress=False
    )
    assert (summary.crops_written, summary.crops_already_done) == (1, 7)
    assert lost.read_bytes() == expected and untouched.stat().st_mtime_ns == stamp
    assert read_manifest(output / "manifest.jsonl") == records

    assert prepare_main(args + ["--seed", "1"]) == 2
    assert "seed" in capsys.readouterr().err


def test_prepare_data_captions_from_sidecars_and_a_captioner(photos: Path, tmp_path: Path) -> None:
    write_caption(photos / "photo1.png", "The image shows a striped test pattern. It is colourful. More.")

    summary = prepare_training_set([photos], tmp_path / "sidecar", hq_size=HQ, captions="sidecar", progress=False)
    captions = {Path(r.source).name: r.caption for r in read_manifest(tmp_path / "sidecar" / "manifest.jsonl")}
    assert captions["photo1.png"] == "A striped test pattern. It is colourful."
    assert captions["photo0.png"] == "" and summary.missing_captions == 3
    (photos / "photo1.json").unlink()

    class SizeCaptioner:
        def caption(self, images, seed=None):
            return [f"a crop of {image.width}x{image.height}" for image in images]

    prepare_training_set(
        [photos],
        tmp_path / "model",
        hq_size=HQ,
        captions="captioner",
        captioner=SizeCaptioner(),
        caption_batch_size=3,
        progress=False,
    )
    records = read_manifest(tmp_path / "model" / "manifest.jsonl")
    assert len(records) == 4 and all(r.caption == f"a crop of {HQ}x{HQ}" for r in records)


def _turned_jpeg(path: Path, width: int, height: int) -> np.ndarray:
    """A JPEG stored ``width`` x ``height`` with EXIF orientation 6 (shown turned 90 degrees clockwise); returns the
    upright RGB pixels, as Pillow's ``exif_transpose`` shows them."""
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    structured_photo(width, height, seed=7).save(path, quality=95, exif=exif)
    with PIL.Image.open(path) as opened:
        return np.asarray(PIL.ImageOps.exif_transpose(opened).convert("RGB"))


def _grey16(path: Path, width: int, height: int) -> np.ndarray:
    """A 16-bit greyscale PNG of a ramp; returns its levels in [0, 1]."""
    y, x = np.mgrid[0:height, 0:width]
    levels = (9000 + 400 * x + 500 * y).astype(np.uint16)
    PIL.Image.fromarray(levels).save(path)
    return levels / 65535.0


def test_training_reads_exif_turned_and_16_bit_photos(tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    upright = _turned_jpeg(folder / "turned.jpg", 96, 72)  # upright 72 x 96
    levels = _grey16(folder / "grey16.png", 80, 72)
    assert np.array_equal(np.asarray(load_rgb(folder / "turned.jpg")), upright)
    grey = np.asarray(load_rgb(folder / "grey16.png"))
    assert grey.shape == (72, 80, 3) and abs(grey.mean() / 255 - levels.mean()) < 1 / 255  # not washed out

    output = tmp_path / "set"
    prepare_training_set([folder], output, hq_size=HQ, captions="none", progress=False)
    records = {Path(r.source).name: r for r in read_manifest(output / "manifest.jsonl")}
    turned, grey16 = records["turned.jpg"], records["grey16.png"]
    assert turned.source_size == (72, 96) and grey16.source_size == (80, 72)
    left, top, right, bottom = turned.crop_box
    assert np.array_equal(np.asarray(load_rgb(output / turned.hq)), upright[top:bottom, left:right])
    left, top, right, bottom = grey16.crop_box
    crop = np.asarray(load_rgb(output / grey16.hq))
    assert abs(crop.mean() / 255 - levels[top:bottom, left:right].mean()) < 1 / 255

    # On the fly: the same readers (sources sorted by key: grey16 first); unflipped, so that time_ids give the box.
    dataset = DegradingDataset([folder], hq_size=HQ, seed=0, caption_dropout=0.0, random_flip=False)
    assert len(dataset) == 2 and not dataset.unreadable and not dataset.skipped_small
    example = dataset[0]
    _, _, top, left, size, _ = (int(v) for v in example["time_ids"].tolist())
    expected = levels[top : top + size, left : left + size].mean()
    assert abs((example["hq"].mean().item() + 1) / 2 - expected) < 1 / 255
    assert dataset[1]["time_ids"].tolist()[:2] == [96.0, 72.0]  # (height, width) of the upright photo


# ------------------------------------------------------------------------------------------------ datasets
def test_on_the_fly_dataset_shapes_and_reproducibility(photos: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    structured_photo(48, 48, seed=5).save(small / "tiny.png")
    dataset = DegradingDataset([photos, small], hq_size=HQ, seed=3, caption_dropout=0.0)
    assert len(dataset) == 4 and [p.name for p in dataset.skipped_small] == ["tiny.png"]

    example = dataset[2]
    assert example["hq"].shape == example["lq"].shape == (3, HQ, HQ)
    assert example["hq"].min() >= -1 and example["hq"].max() <= 1 and example["caption"] == ""
    height, width, top, left, target_h, target_w = example["time_ids"].tolist()
    source_width = load_rgb(dataset.sources[2].path).width
    assert (height, width, target_h, target_w) == (80, source_width // 4 * 4, HQ, HQ)
    assert top % 4 == 0 and left % 4 == 0 and top + HQ <= 80 and left + HQ <= source_width
    # The LQ input is a degraded 16-px crop upscaled back: not the HQ crop.
    assert (example["lq"] - example["hq"]).abs().mean() > 0.01

    again = DegradingDataset([photos], hq_size=HQ, seed=3, caption_dropout=0.0)[2]
    assert all(torch.equal(example[k], again[k]) for k in ("hq", "lq", "time_ids"))
    dataset.set_epoch(1)
    assert not torch.equal(dataset[2]["lq"], example["lq"])
    other_seed = DegradingDataset([photos], hq_size=HQ, seed=4, caption_dropout=0.0)[2]
    assert not torch.equal(other_seed["lq"], example["lq"])


def test_prepared_dataset_reads_the_manifest(manifest: Path) -> None:
    dataset = PreparedPairsDataset(manifest, seed=0, caption_dropout=1.0, random_flip=False)
    record = dataset.records[1]
    example = dataset[1]
    assert (dataset.hq_size, dataset.scale, len(dataset)) == (HQ, 4, 4)
    assert torch.equal(example["hq"], to_model_range(load_rgb(manifest.parent / record.hq)))
    assert example["lq"].shape == (3, HQ, HQ) and example["caption"] == ""
    assert example["time_ids"].tolist() == micro_conditioning(record.source_size, record.crop_box, 4)
    lq, _ = dataset.validation_pair(1)
    assert lq.size == (HQ // 4, HQ // 4)


def test_flipped_pair_measures_the_crop_left_edge_in_the_flipped_image() -> None:
    from faithdiff_pipeline.training.data import training_example

    hq = structured_photo(HQ, HQ, seed=2)
    lq = hq.resize((HQ // 4, HQ // 4))
    # original (height, width) 80 x 100, crop at top 8, left 12 of the unflipped image
    time_ids = [80.0, 100.0, 8.0, 12.0, float(HQ), float(HQ)]
    seen = set()
    for seed in range(20):
        flipped = torch.rand((), generator=torch.Generator().manual_seed(seed)).item() < 0.5  # its first draw
        example = training_example(hq, lq, "", time_ids, torch.Generator().manual_seed(seed), 0.0, random_flip=True)
        if flipped:
            assert torch.equal(example["hq"], to_model_range(hq).flip(-1))
            assert example["time_ids"].tolist() == [80.0, 100.0, 8.0, 100.0 - 12.0 - HQ, HQ, HQ]
        else:
            assert torch.equal(example["hq"], to_model_range(hq))
            assert example["time_ids"].tolist() == time_ids
        seen.add(flipped)
    assert seen == {True, False}
    unflipped = training_example(hq, lq, "", time_ids, torch.Generator().manual_seed(0), 0.0, random_flip=False)
    assert unflipped["time_ids"].tolist() == time_ids


def test_data_loader_keeps_the_last_incomplete_batch_by_default(manifest: Path) -> None:
    from faithdiff_pipeline.training.train import _data_loader

    dataset = PreparedPairsDataset(manifest, seed=0)  # 4 pairs
    assert TrainingConfig().drop_last is False
    batches = list(_data_loader(dataset, TrainingConfig(train_batch_size=3, dataloader_num_workers=0)))
    assert [len(b["caption"]) for b in batches] == [3, 1]
    dropped = _data_loader(dataset, TrainingConfig(train_batch_size=3, dataloader_num_workers=0, drop_last=True))
    assert [len(b["caption"]) for b in dropped] == [3]


def test_prepared_set_shows_another_crop_of_an_image_in_each_epoch(photos: Path, tmp_path: Path) -> None:
    prepare_training_set([photos], tmp_path, hq_size=HQ, crops_per_image=3, captions="none", progress=False)
    manifest = tmp_path / "manifest.jsonl"
    dataset = PreparedPairsDataset(manifest, seed=0, random_flip=False)
    assert len(dataset) == 4  # one example per image and epoch (12 crops)
    by_epoch = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        by_epoch.append([dataset[i]["hq"] for i in range(len(dataset))])
        # each example is one crop of the image it stands for
        assert {Path(dataset.records[dataset.record_index(i)].source).name for i in range(4)} == {
            f"photo{i}.png" for i in range(4)
        }
    for image in range(4):
        crops = [by_epoch[epoch][image] for epoch in range(3)]
        # three epochs: three different windows of the image, each read from the prepared HQ crops
        assert not any(torch.equal(crops[a], crops[b]) for a, b in ((0, 1), (1, 2), (0, 2))), image
    # the fixed-crop behaviour: every crop is an example in every epoch
    every = PreparedPairsDataset(manifest, seed=0, random_flip=False, crops="all")
    assert len(every) == 12
    first = [every[i]["hq"] for i in range(12)]
    every.set_epoch(1)
    assert all(torch.equal(a, every[i]["hq"]) for i, a in enumerate(first))
    with pytest.raises(ValueError, match="`crops`"):
        PreparedPairsDataset(manifest, crops="random")


# ---------------------------------------------------------------------------------------------------- loss
def test_loss_against_an_independent_computation() -> None:
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    latents = torch.linspace(-2, 2, 2 * 4 * 3 * 3).reshape(2, 4, 3, 3)
    noised = noise_latents(scheduler, latents, noise_offset=0.02, generator=torch.Generator().manual_seed(11))

    draws = torch.Generator().manual_seed(11)
    base = torch.randn(2, 4, 3, 3, generator=draws)
    offset = torch.randn(2, 4, 1, 1, generator=draws)
    timesteps = torch.randint(0, 1000, (2,), generator=draws)
    expected_noise = base + 0.02 * offset
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[timesteps].float().view(2, 1, 1, 1)
    expected = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * expected_noise

    assert torch.equal(noised.timesteps, timesteps)
    torch.testing.assert_close(noised.noise, expected_noise, rtol=0, atol=1e-7)
    torch.testing.assert_close(noised.noisy, expected, rtol=1e-6, atol=1e-6)
    # The offset is constant over each channel of each sample.
    torch.testing.assert_close((noised.noise - base).std(dim=(2, 3)), torch.zeros(2, 4), rtol=0, atol=1e-7)

    prediction = torch.full_like(latents, 0.5, dtype=torch.float16)
    manual = sum(abs(0.5 - v) for v in expected_noise.flatten().tolist()) / expected_noise.numel()
    assert epsilon_loss(prediction, noised.noise).dtype == torch.float32
    assert epsilon_loss(prediction, noised.noise).item() == pytest.approx(manual, rel=1e-6)


# -------------------------------------------------------------------------------------------------- stages
@pytest.mark.slow
def test_stage1_trains_only_the_alignment_module(stage1_run: Path, sdxl_base: Path) -> None:
    pipeline = stage1_run / "checkpoint-2" / "pipeline"
    state = json.loads((stage1_run / "checkpoint-2" / "training_state.json").read_text())
    files = state.pop("files")  # every file of the checkpoint with its size, listed last
    assert state == {"step": 2, "stage": 1, "pipeline_weights": "trained"}
    assert files["pipeline/training.json"] == (pipeline / "training.json").stat().st_size
    assert "model.safetensors" in files
    assert json.loads((pipeline / "training.json").read_text()) == {"weights": "trained"}
    base = tiny_components()
    assert _equal(_weights(pipeline / "unet"), _weights(sdxl_base / "unet"))
    assert _equal(_weights(pipeline / "vae"), _weights(sdxl_base / "vae"))
    # The LQ encoder is a frozen copy of the VAE encoder; the alignment module started at zero output and moved.
    assert _equal(_weights(pipeline / "lq_encoder"), FaithDiffLQEncoder.from_vae(base["vae"]).state_dict())
    alignment = _weights(pipeline / "alignment")
    assert alignment["proj_out.weight"].abs().sum() > 0 and torch.isfinite(alignment["proj_out.weight"]).all()
    assert (stage1_run / "validation" / "step-2" / "00.png").is_file()

    pipe = FaithDiffSDXLPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    restored = pipe(
        structured_photo(16, 16, seed=1), prompt="a photo", upscale=4, num_inference_steps=2, tile_size=HQ, output_type="pt"
    ).images
    assert restored.shape == (1, 3, HQ, HQ) and torch.isfinite(restored).all()


@pytest.mark.slow
def test_stage2_trains_unet_alignment_and_lq_encoder(stage1_run: Path, photos: Path, tmp_path: Path) -> None:
    """Stage 2 on the fly: HQ photos cropped and degraded in the data loader."""
    stage1 = stage1_run / "checkpoint-2" / "pipeline"
    settings = _settings(None, tmp_path, validation_steps=2, num_validation_images=1, validation_inference_steps=2)
    settings.update(train_folders=[str(photos)], hq_size=HQ, degradation="dasr-level1")
    result = train(TrainingConfig(stage=2, stage1_checkpoint=str(stage1), **settings))
    assert (result.step, result.steps_run) == (2, 2) and np.isfinite(result.last_loss)
    assert PIL.Image.open(tmp_path / "validation" / "step-2" / "00.png").size == (HQ, HQ)
    stage2 = result.checkpoint / "pipeline"
    for trained in ("unet", "alignment", "lq_encoder"):
        before, after = _weights(stage1 / trained), _weights(stage2 / trained)
        assert not _equal(before, after), trained
        assert all(torch.isfinite(v).all() for v in after.values())
    for frozen in ("vae", "text_encoder", "text_encoder_2"):
        assert _equal(_weights(stage1 / frozen), _weights(stage2 / frozen)), frozen


def test_stage_parameter_groups() -> None:
    config = TrainingConfig(learning_rate=5e-5, lq_encoder_learning_rate=5e-6)
    pipe = FaithDiffSDXLPipeline(**tiny_components())
    module = training_module(pipe, 2, gradient_checkpointing=True)
    groups = parameter_groups(module, 2, config)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet+alignment", 5e-5), ("lq_encoder", 5e-6)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in pipe.lq_encoder.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))
    assert pipe.unet.is_gradient_checkpointing and pipe.lq_encoder.encoder.gradient_checkpointing

    module = training_module(pipe, 1, gradient_checkpointing=False)
    assert STAGE_RECIPES[1].trained == ("alignment",)
    assert [n for n, _ in module.named_children()] == ["alignment"]
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    assert not any(p.requires_grad for p in pipe.lq_encoder.parameters())


# ---------------------------------------------------------------------------------------------- resumption
@pytest.mark.slow
def test_resuming_matches_an_uninterrupted_run(stage1_run: Path, manifest: Path, tmp_path: Path) -> None:
    """4 pairs, batch 1, accumulation 2: 2 steps per epoch. Resuming after step 1 skips the 2 batches already seen,
    crosses into epoch 1, and ends where the uninterrupted run ends (weights, EMA, LR schedule)."""
    stage1 = str(stage1_run / "checkpoint-2" / "pipeline")
    settings = _settings(
        manifest,
        tmp_path / "whole",
        max_train_steps=3,
        checkpointing_steps=1,
        use_ema=True,
        ema_update_interval=1,
        export_ema_weights=True,
        lr_warmup_steps=2,
    )
    whole = train(TrainingConfig(stage=2, stage1_checkpoint=stage1, **settings))
    assert (whole.step, whole.steps_run) == (3, 3)

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-1", resumed_dir / "checkpoint-1")
    settings.update(output_dir=str(resumed_dir), resume_from_checkpoint="latest")
    resumed = train(TrainingConfig(stage=2, stage1_checkpoint=stage1, **settings))
    assert (resumed.step, resumed.steps_run) == (3, 2)
    assert json.loads((resumed.checkpoint / "training_state.json").read_text())["step"] == 3
    assert json.loads((resumed.checkpoint / "pipeline" / "training.json").read_text()) == {"weights": "ema"}

    for part in ("unet", "alignment", "lq_encoder"):
        final = _weights(whole.checkpoint / "pipeline" / part)
        assert _equal(final, _weights(resumed.checkpoint / "pipeline" / part)), part
        assert not _equal(final, _weights(tmp_path / "whole" / "checkpoint-1" / "pipeline" / part)), part
    # Raw weights (accelerate's state) and the LR schedule match too; the exported pipeline holds the EMA.
    raw = load_file(whole.checkpoint / "model.safetensors")
    assert _equal(raw, load_file(resumed.checkpoint / "model.safetensors"))
    assert not torch.equal(
        raw["alignment.proj_out.weight"], _weights(whole.checkpoint / "pipeline" / "alignment")["proj_out.weight"]
    )
    schedules = [torch.load(c / "scheduler.bin", weights_only=True) for c in (whole.checkpoint, resumed.checkpoint)]
    assert schedules[0]["_last_lr"] == schedules[1]["_last_lr"] and schedules[0]["last_epoch"] == 3


def test_damaged_checkpoints_are_named_and_latest_falls_back_to_a_complete_one(
    stage1_run: Path, manifest: Path, sdxl_base: Path, tmp_path: Path, monkeypatch, capsys, caplog
) -> None:
    """checkpoint-3 is damaged in each way a crash or an interrupted copy leaves one: naming it is one line (before
    any model loads) that names what is wrong and the complete checkpoint-2; `latest` resumes from checkpoint-2 and
    says which checkpoint it skipped."""
    import logging

    from faithdiff_pipeline.training import stages
    from faithdiff_pipeline.training.checkpoints import STATE_NAME, list_checkpoints, resolve_resume

    output = tmp_path / "run"
    output.mkdir()
    shutil.copytree(stage1_run / "checkpoint-2", output / "checkpoint-2")
    state = json.loads((output / "checkpoint-2" / STATE_NAME).read_text())
    weights = output / "checkpoint-2" / "model.safetensors"
    assert state["step"] == 2 and state["files"]["model.safetensors"] == weights.stat().st_size

    def cut(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    damages = {
        "model.safetensors is cut off or damaged": lambda folder: cut(folder / "model.safetensors"),
        f"its {STATE_NAME} is cut off or damaged": lambda folder: cut(folder / STATE_NAME),
        f"it has no {STATE_NAME} (it was never finished)": lambda folder: (folder / STATE_NAME).unlink(),
        "pipeline/unet/diffusion_pytorch_model.safetensors is missing": lambda folder: (
            folder / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
        ).unlink(),
    }
    args = ["--stage", "1", "--train-manifest", str(manifest), "--pretrained-model", str(sdxl_base), "--vae", "null"]
    args += ["--output-dir", str(output), "--report-to", "none", "--mixed-precision", "no", "--max-train-steps", "2"]
    args += ["--train-batch-size", "1", "--effective-batch-size", "2", "--dataloader-num-workers", "0"]
    args += ["--validation-steps", "0", "--seed", "7"]
    damaged = output / "checkpoint-3"
    for problem, damage in damages.items():
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(output / "checkpoint-2", damaged)
        (damaged / STATE_NAME).write_text(json.dumps({**state, "step": 3}) + "\n")
        assert [step for step, _ in list_checkpoints(output)] == [2, 3]
        damage(damaged)
        assert [step for step, _ in list_checkpoints(output)] == [2], problem

        checkpoint, note = resolve_resume("latest", output)
        assert checkpoint == output / "checkpoint-2", problem
        assert note.startswith("Resuming from checkpoint-2") and f"{damaged} ({problem}" in note, note

        with monkeypatch.context() as patch:
            patch.setattr(stages, "load_starting_pipeline", lambda config: pytest.fail("a model loaded"))
            assert train_main([*args, "--resume-from-checkpoint", str(damaged)]) == 2, problem
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"faithdiff-train: error: `resume_from_checkpoint` {str(damaged)!r} is not a complete")
        assert problem in error and f"resume from {str(output / 'checkpoint-2')!r}" in error and "\n" not in error

    # `latest` resumes from checkpoint-2 (at its step 2, the end: nothing left to run) and names what it skipped.
    with caplog.at_level(logging.WARNING):
        assert train_main([*args, "--resume-from-checkpoint", "latest"]) == 0
    notes = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert len(notes) == 1 and str(damaged) in notes[0], notes
    assert f"trained pipeline: {output / 'checkpoint-2' / 'pipeline'}" in capsys.readouterr().out

    # Nothing complete: `latest` refuses rather than start afresh over the damaged checkpoints.
    shutil.rmtree(output / "checkpoint-2")
    with pytest.raises(TrainingSetupError, match="'latest' finds no complete checkpoint in .*checkpoint-3"):
        resolve_resume("latest", output)


# --------------------------------------------------------------------------------------------------- EMA
def _toy_ema(counting: str, steps: range, interval: int = 100) -> tuple[list[float], list[float]]:
    """EMA of one parameter that ramps from 0 to 1 over ``steps``, updated every ``interval`` steps."""
    from diffusers.training_utils import EMAModel

    from faithdiff_pipeline.training.checkpoints import update_ema

    param = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    ema = EMAModel([param], decay=0.9999)
    decays, averages = [], []
    for step in steps:
        param.data.fill_(step / steps[-1])
        if step % interval == 0:
            update_ema(ema, [param], step, counting)
            decays.append(ema.cur_decay_value)
            averages.append(ema.shadow_params[0].item())
    return decays, averages


def _expected_ema(counters: list[int], values: list[float]) -> tuple[list[float], list[float]]:
    """The warm-up EMA restated: decay min(0.9999, n / (n + 9)) for counter n (0 at n = 1: the first update copies)."""
    decays, averages, average = [], [], 0.0
    for n, value in zip(counters, values):
        decay = min(0.9999, (n - 1 + 1) / (n - 1 + 10)) if n > 1 else 0.0
        average = decay * average + (1 - decay) * value
        decays.append(decay)
        averages.append(average)
    return decays, averages


def test_ema_global_step_counting_reproduces_the_release_and_default_is_diffusers() -> None:
    steps = range(1, 6001)
    update_steps = [s for s in steps if s % 100 == 0]
    values = [s / 6000 for s in update_steps]

    release_decays, release_averages = _toy_ema("global_step", steps)
    expected_decays, expected_averages = _expected_ema(update_steps, values)
    assert release_decays == pytest.approx(expected_decays, rel=1e-12)
    assert release_averages == pytest.approx(expected_averages, rel=1e-9)
    assert release_decays[0] == pytest.approx(100 / 109)
    assert release_averages[-1] == pytest.approx(0.0826, abs=1e-3)  # the average stays near the early weights

    default_decays, default_averages = _toy_ema("diffusers", steps)
    expected_decays, expected_averages = _expected_ema(list(range(1, len(update_steps) + 1)), values)
    assert default_decays == pytest.approx(expected_decays, rel=1e-12)
    assert default_averages == pytest.approx(expected_averages, rel=1e-9)
    assert default_averages[-1] == pytest.approx(0.90, abs=1e-3)

    # The default is exactly diffusers' EMAModel stepped on its own.
    from diffusers.training_utils import EMAModel

    param = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    plain = EMAModel([param], decay=0.9999)
    plain_averages = []
    for step in steps:
        param.data.fill_(step / 6000)
        if step % 100 == 0:
            plain.step([param])
            plain_averages.append(plain.shadow_params[0].item())
    assert default_averages == plain_averages


def test_exported_pipeline_holds_the_trained_weights_by_default(
    manifest: Path, sdxl_base: Path, tmp_path: Path
) -> None:
    settings = _settings(manifest, tmp_path, use_ema=True, ema_update_interval=1, ema_counting="global_step")
    result = train(TrainingConfig(stage=1, pretrained_model=str(sdxl_base), **settings))
    raw = load_file(result.checkpoint / "model.safetensors")
    exported = _weights(result.checkpoint / "pipeline" / "alignment")
    assert _equal({f"alignment.{k}": v for k, v in exported.items()}, raw)
    ema = torch.load(result.checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    assert ema["optimization_step"] == 2  # the global step
    assert not torch.equal(ema["shadow_params"][-2], raw["alignment.proj_out.weight"])
    assert json.loads((result.checkpoint / "pipeline" / "training.json").read_text()) == {"weights": "trained"}
    assert json.loads((result.checkpoint / "training_state.json").read_text())["pipeline_weights"] == "trained"
    base = {**settings, "pretrained_model": str(sdxl_base)}
    with pytest.raises(TrainingSetupError, match="export_ema_weights"):
        TrainingConfig(**{**base, "use_ema": False, "export_ema_weights": True}).resolve()
    with pytest.raises(TrainingSetupError, match="ema_counting"):
        TrainingConfig(**{**base, "ema_counting": "epochs"}).resolve()


# ---------------------------------------------------------------------------------------------- user errors
def test_configuration_mistakes_are_one_line_errors(manifest: Path, sdxl_base: Path, tmp_path: Path, capsys) -> None:
    common = ["--pretrained-model", str(sdxl_base), "--output-dir", str(tmp_path), "--report-to", "none"]
    cases = {
        "train_manifest": ["--stage", "1", "--train-manifest", str(tmp_path / "missing.jsonl")],
        "effective_batch_size": ["--stage", "1", "--train-manifest", str(manifest), "--train-batch-size", "3"],
        "stage1_checkpoint": ["--stage", "2", "--train-manifest", str(manifest), "--effective-batch-size", "null"],
        "learning_rate": ["--stage", "1", "--train-manifest", str(manifest), "--learning-rate", "fast"],
        "pretrained_model": [
            "--stage",
            "1",
            "--train-manifest",
            str(manifest),
            "--pretrained-model",
            str(tmp_path / "nope"),
        ],
    }
    for name, args in cases.items():
        assert train_main(args + (common if name != "pretrained_model" else common[2:])) == 2, name
        error = capsys.readouterr().err.strip()
        assert error.startswith("faithdiff-train: error:") and f"`{name}`" in error and "\n" not in error, error

    with pytest.raises(TrainingSetupError, match="unknown|Unknown"):
        TrainingConfig.from_dict({"learning_rat": 1e-5})
    both = {"learning_rate": "1e-5", "stage1": {"max_train_steps": 10}, "stage2": {"max_train_steps": 20}}
    assert TrainingConfig.from_dict(both, stage=2).max_train_steps == 20
    assert TrainingConfig.from_dict(both, stage=1).learning_rate == 1e-5


def test_yaml_syntax_errors_are_one_line_naming_the_file_line_and_column(
    photos: Path, sdxl_base: Path, tmp_path: Path, capsys
) -> None:
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("stage1:\n  learning_rate: 1e-5\n  max_train_steps: [10, 20\n", encoding="utf-8")
    bad_degradation = tmp_path / "degradation.yaml"
    bad_degradation.write_text("scale: 4\nblur_sigma: [0.2, 3\nnoise_range: [1, 30]\n", encoding="utf-8")
    common = ["--pretrained-model", str(sdxl_base), "--vae", "null", "--output-dir", str(tmp_path / "out")]
    runs = {
        bad_config: lambda: train_main(["--stage", "1", "--config", str(bad_config), *common]),
        bad_degradation: lambda: train_main(
            ["--stage", "1", "--train-folders", str(photos), "--degradation", str(bad_degradation), *common]
        ),
    }
    for path, run in runs.items():
        assert run() == 2, path
        error = capsys.readouterr().err.strip()
        assert error.startswith("faithdiff-train: error:") and "\n" not in error, error
        assert f"{str(path)!r} is not valid YAML: line" in error and "column" in error, error
    assert "line 4, column 1" in str(pytest.raises(TrainingSetupError, TrainingConfig.from_yaml, bad_config).value)
    assert prepare_main([str(photos), "-o", str(tmp_path / "set"), "--degradation", str(bad_degradation)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("faithdiff-prepare-data: error: Degradation settings file") and "\n" not in error
    assert "line 3, column 12" in error
    assert not (tmp_path / "set").exists() and not (tmp_path / "out").exists()


def test_negative_numbers_are_values_that_the_range_checks_refuse(photos: Path, tmp_path: Path, capsys) -> None:
    common = ["--stage", "1", "--train-folders", str(photos), "--output-dir", str(tmp_path / "out")]
    for value in ("-1e-4", "-0.5", "-inf"):
        assert train_main([*common, "--learning-rate", value]) == 2, value
        error = capsys.readouterr().err.strip()
        assert error.startswith("faithdiff-train: error: `learning_rate` must be a finite number > 0, got"), error
    assert train_main([*common, "--noise-offset", "-2e-2"]) == 2
    assert "`noise_offset` must be a finite number >= 0, got -0.02." in capsys.readouterr().err


def test_spatial_attention_option_reaches_a_new_alignment_module(sdxl_base: Path) -> None:
    from faithdiff_pipeline.training.stages import load_starting_pipeline

    for spatial in (False, True):
        pipe = load_starting_pipeline(
            TrainingConfig(stage=1, pretrained_model=str(sdxl_base), vae=None, spatial_attention=spatial)
        )
        assert pipe.alignment.config.spatial_attention is spatial
        assert all(block.spatial is spatial for block in pipe.alignment.blocks)
        assert torch.count_nonzero(pipe.alignment.proj_out.weight) == 0  # starts as a no-op


@pytest.mark.slow
def test_the_loop_learns_on_one_image(photos: Path, sdxl_base: Path, tmp_path: Path, monkeypatch) -> None:
    """Stage 1 from SDXL, then stage 2 on one image for 100 steps: the loss of the last 25 steps is clearly below the
    first 25 (each step draws a new timestep and noise, so single losses are noisy; means are not)."""
    from faithdiff_pipeline.training import train as train_module

    losses: list[float] = []
    original = train_module._TrainingLoop.after_step
    monkeypatch.setattr(
        train_module._TrainingLoop,
        "after_step",
        lambda self, step, loss: losses.append(loss) or original(self, step, loss),
    )
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(next(photos.glob("*.png")), one / "photo.png")
    stage1 = train(
        TrainingConfig(
            stage=1,
            pretrained_model=str(sdxl_base),
            **_settings(
                None, tmp_path / "s1", train_folders=[str(one)], hq_size=HQ, max_train_steps=1, checkpointing_steps=1
            ),
        )
    )
    losses.clear()
    settings = _settings(
        None,
        tmp_path / "s2",
        train_folders=[str(one)],
        hq_size=HQ,
        max_train_steps=100,
        checkpointing_steps=100,
        effective_batch_size=1,
        lr_warmup_steps=0,
        lr_scheduler="constant",
        caption_dropout=0.0,
    )
    train(TrainingConfig(stage=2, stage1_checkpoint=str(stage1.checkpoint / "pipeline"), **settings))
    assert len(losses) == 100 and all(np.isfinite(losses))
    first, last = np.mean(losses[:25]), np.mean(losses[-25:])
    assert last < 0.7 * first, (first, last)


def test_caption_dropout_rate(manifest: Path) -> None:
    """Over many (epoch, index) draws the empty-caption rate matches caption_dropout (4 binomial standard deviations)."""
    import dataclasses

    dataset = PreparedPairsDataset(manifest, seed=0, caption_dropout=0.2, random_flip=False)
    dataset.records = [dataclasses.replace(record, caption="A photo.") for record in dataset.records]
    draws = []
    for epoch in range(100):
        dataset.set_epoch(epoch)
        draws += [dataset[i]["caption"] == "" for i in range(len(dataset))]
    n, rate = len(draws), 0.2
    assert abs(sum(draws) - n * rate) <= 4 * (n * rate * (1 - rate)) ** 0.5


def test_prepare_data_captions_through_the_loading_modules_choice(tmp_path, capsys) -> None:
    from tiny_models import tiny_captioner

    from faithdiff_pipeline.training.data import MANIFEST_NAME

    model, processor = tiny_captioner()
    model.save_pretrained(tmp_path / "captioner")
    processor.save_pretrained(tmp_path / "captioner")
    (tmp_path / "photos").mkdir()
    structured_photo(160, 144, seed=1).save(tmp_path / "photos" / "a.png")
    common = [str(tmp_path / "photos"), "--hq-size", "128", "--no-progress", "--captioner-device", "cpu"]
    # The default (the release's LLaVA where a CUDA GPU holds it) has no GPU here: one line, naming the options.
    assert prepare_main([*common, "-o", str(tmp_path / "default")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("faithdiff-prepare-data: error: no caption source: the default captioner")
    assert "needs a CUDA GPU" in error and "--captioner none" in error
    assert prepare_main([*common, "-o", str(tmp_path / "set"), "--captioner", str(tmp_path / "captioner")]) == 0
    settings = json.loads((tmp_path / "set" / "dataset.json").read_text())
    assert str(tmp_path / "captioner") in json.dumps(settings)
    records = [json.loads(line) for line in (tmp_path / "set" / MANIFEST_NAME).read_text().splitlines()]
    assert records and all(isinstance(record["caption"], str) for record in records)


def test_prepare_training_set_refuses_without_a_caption_source(photos: Path, tmp_path: Path) -> None:
    # The Python API, like the command, writes empty captions only when asked for by name.
    with pytest.raises(ValueError, match="captioner=.*captions='sidecar'.*captions='none'"):
        prepare_training_set([photos], tmp_path / "set", hq_size=HQ, progress=False)
    assert not (tmp_path / "set").exists()


def test_face_branch_resizes_a_face_and_one_of_its_two_lq_versions(tmp_path: Path, capsys) -> None:
    from faithdiff_pipeline.seeds import hashed_seed
    from faithdiff_pipeline.training.data import face_variant_lq
    from faithdiff_pipeline.training.prepare import FACE_LQ_VARIANTS

    faces = tmp_path / "faces"
    faces.mkdir()
    face = structured_photo(HQ * 2, HQ * 2, seed=4)
    face.save(faces / "face.png")
    output = tmp_path / "set"
    args = ["--faces", str(faces), "-o", str(output), "--hq-size", str(HQ), "--crops-per-image", "12"]
    assert prepare_main([*args, "--captioner", "none", "--no-progress"]) == 0
    assert "1 image(s) (1 face(s)): 12 crop(s) written" in capsys.readouterr().out
    assert json.loads((output / "dataset.json").read_text())["face_folders"] == ["faces"]

    degradation, scale, lq_size = DegradationConfig(), 4, HQ // 4
    seeds = [hashed_seed(0, "faces/face.png", "face-lq", v) for v in range(FACE_LQ_VARIANTS)]
    variants = [face_variant_lq(face, degradation, torch.Generator().manual_seed(seed)) for seed in seeds]
    sides, used = set(), set()
    for record in read_manifest(output / "manifest.jsonl"):
        width, height = record.source_size
        side = width // scale
        # The face and its LQ version are resized to a random square: 1-1.5x the LQ crop (128-192 px at 512 px).
        assert width == height and lq_size <= side <= lq_size * 3 // 2
        sides.add(side)
        hq, lq = load_rgb(output / record.hq), load_rgb(output / record.lq)
        box = record.crop_box
        assert np.array_equal(np.asarray(hq), np.asarray(face.resize((width, width), PIL.Image.BICUBIC).crop(box)))
        lq_box = tuple(v // scale for v in box)
        matches = [
            v
            for v, variant in enumerate(variants)
            if np.array_equal(np.asarray(lq), np.asarray(variant.resize((side, side), PIL.Image.BICUBIC).crop(lq_box)))
        ]
        assert len(matches) == 1
        used.add(matches[0])
    assert used == {0, 1} and len(sides) > 2

    # A face folder cannot share its name with a photo folder: the crops are named after the folder.
    clash = tmp_path / "other" / "faces"
    clash.mkdir(parents=True)
    assert prepare_main([str(clash), *args, "--captioner", "none", "--no-progress"]) == 2
    assert "same name" in capsys.readouterr().err
