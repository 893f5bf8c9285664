"""The paper's ablations as training switches: the "w/o align" alignment module, the encoder's last-layer features,
stage 2 without stage 1, and stage 2 with the UNet or the LQ encoder frozen; each trained, saved, loaded and run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tiny_models import fast_call, structured_photo, tiny_components
from faithdiff_pipeline import FaithDiffAlignmentModel, FaithDiffLQEncoder, FaithDiffSDXLPipeline
from faithdiff_pipeline.alignment import ALIGNMENT_TYPES
from faithdiff_pipeline.lq_features import FEATURE_SOURCES, encoder_mid_block_features, vae_feature_source
from faithdiff_pipeline.training import TrainingConfig, TrainingSetupError
from faithdiff_pipeline.training import config as config_module
from faithdiff_pipeline.training.stages import load_starting_pipeline, parameter_groups, training_module
from faithdiff_pipeline.training.train import build_parser, train
from faithdiff_pipeline.training.train import main as train_main

HQ = 64  # 16-px LQ crops, 8 x 8 latents
LATENT_WIDTH = 32  # the tiny UNet's conv_in width
MID_BLOCK_WIDTH = 64  # the tiny VAE's mid block
LAST_LAYER_WIDTH = 8  # 2 x the VAE's 4 latent channels


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ablation-photos")
    for i in range(2):
        structured_photo(96, 80, seed=i).save(folder / f"photo{i}.png")
    return folder


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ablation-sdxl")
    components = tiny_components()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        components[name].save_pretrained(folder / name)
    return folder


def _settings(photos: Path, output: Path, **overrides) -> dict:
    """Two optimiser steps of batch 1 x accumulation 2 on HQ photos degraded on the fly."""
    settings = {
        "train_folders": [str(photos)],
        "hq_size": HQ,
        "output_dir": str(output),
        "train_batch_size": 1,
        "effective_batch_size": 2,
        "max_train_steps": 2,
        "checkpointing_steps": 2,
        "validation_steps": 0,
        "learning_rate": 1e-3,
        "lq_encoder_learning_rate": 1e-3,
        "lr_warmup_steps": 1,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "mixed_precision": "no",
        "vae": None,
        "seed": 3,
    }
    settings.update(overrides)
    return settings


@pytest.fixture(scope="module")
def conv_add_stage1(photos: Path, sdxl_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage 1 of the "w/o align" model; returns its pipeline folder."""
    output = tmp_path_factory.mktemp("conv-add-stage1")
    config = TrainingConfig(
        stage=1, pretrained_model=str(sdxl_base), **_settings(photos, output, alignment_type="conv_add")
    )
    return train(config).checkpoint / "pipeline"


@pytest.fixture(scope="module")
def last_layer_stage1(photos: Path, sdxl_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage 1 of the "w last layer" model; returns its pipeline folder."""
    output = tmp_path_factory.mktemp("last-layer-stage1")
    config = TrainingConfig(
        stage=1, pretrained_model=str(sdxl_base), **_settings(photos, output, lq_feature_source="last_layer")
    )
    return train(config).checkpoint / "pipeline"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next(folder.glob("*.safetensors")))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def _restore(pipe: FaithDiffSDXLPipeline) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    image = structured_photo(16, 16, seed=5)
    return pipe(
        image,
        prompt="a photo",
        upscale=4,
        num_inference_steps=2,
        tile_size=HQ,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and non-zero, so that no path of the module is a no-op."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        centre = 1.0 if param.ndim == 1 and "norm" in name and name.endswith("weight") else 0.0
        param.data.copy_(centre + 0.1 * torch.randn(param.shape, generator=generator))
    return module


# ------------------------------------------------------------------------------------------ the variants
def test_conv_add_is_one_convolution_per_input_added_to_the_latent(tmp_path: Path) -> None:
    fresh = FaithDiffAlignmentModel(
        lq_channels=MID_BLOCK_WIDTH, latent_channels=LATENT_WIDTH, alignment_type="conv_add"
    )
    assert {name for name, _ in fresh.named_parameters()} == {
        "latent_conv.weight",
        "latent_conv.bias",
        "lq_conv.weight",
        "lq_conv.bias",
    }
    hidden = torch.randn(2, LATENT_WIDTH, 6, 5)
    features = torch.randn(2, MID_BLOCK_WIDTH, 6, 5)
    # Fresh, it leaves the UNet's conv_in output unchanged, as the release's module does.
    assert torch.equal(fresh(hidden, features), hidden)

    module = _randomised(fresh, seed=1)
    expected = (
        hidden
        + F.conv2d(hidden, module.latent_conv.weight, module.latent_conv.bias, padding=1)
        + F.conv2d(features, module.lq_conv.weight, module.lq_conv.bias, padding=1)
    )
    with torch.no_grad():
        torch.testing.assert_close(module(hidden, features), expected, rtol=1e-5, atol=1e-5)
        condition = module.embed_condition(features)
        torch.testing.assert_close(module(hidden, condition_embeds=condition), expected, rtol=1e-5, atol=1e-5)

    # Not the release's computation: another layout, and another output for the same inputs.
    transformer = _randomised(FaithDiffAlignmentModel(lq_channels=MID_BLOCK_WIDTH, latent_channels=LATENT_WIDTH), 1)
    assert not set(transformer.state_dict()) & set(module.state_dict())
    with torch.no_grad():
        assert (transformer(hidden, features) - module(hidden, features)).abs().mean() > 1e-2

    module.save_pretrained(tmp_path)
    loaded = FaithDiffAlignmentModel.from_pretrained(tmp_path)
    assert loaded.config.alignment_type == "conv_add" and _equal(loaded.state_dict(), module.state_dict())
    module.zero_init_output()
    assert all(torch.count_nonzero(p) == 0 for p in module.parameters())


def test_last_layer_features_are_the_whole_vae_encoder_output(tmp_path: Path) -> None:
    vae = tiny_components()["vae"]
    image = torch.rand(2, 3, 32, 24) * 2 - 1
    last = FaithDiffLQEncoder.from_vae(vae, "last_layer").eval()
    mid = FaithDiffLQEncoder.from_vae(vae).eval()
    assert (last.feature_channels, mid.feature_channels) == (LAST_LAYER_WIDTH, MID_BLOCK_WIDTH)
    assert hasattr(last.encoder, "conv_out") and not hasattr(mid.encoder, "conv_out")
    with torch.no_grad():
        # diffusers' own Encoder.forward runs the whole encoder, head included: the posterior's mean and log-variance.
        whole = vae.encoder(image)
        features = last(image)
        assert features.shape == (2, LAST_LAYER_WIDTH, 4, 3)
        torch.testing.assert_close(features, whole, rtol=0, atol=0)
        torch.testing.assert_close(mid(image), encoder_mid_block_features(vae.encoder, image), rtol=0, atol=0)

    last.save_pretrained(tmp_path)
    loaded = FaithDiffLQEncoder.from_pretrained(tmp_path).eval()
    assert loaded.config.feature_source == "last_layer" and loaded.feature_channels == LAST_LAYER_WIDTH
    with torch.no_grad():
        assert torch.equal(loaded(image), features)


def test_without_an_lq_encoder_the_vae_gives_the_features_the_alignment_takes(lq_image) -> None:
    parts = tiny_components(with_lq_encoder=False)
    vae = parts["vae"]
    assert vae_feature_source(vae.config, None) == vae_feature_source(vae.config, MID_BLOCK_WIDTH) == "mid_block"
    assert vae_feature_source(vae.config, LAST_LAYER_WIDTH) == "last_layer"
    with pytest.raises(ValueError, match="`channels` 12"):
        vae_feature_source(vae.config, 12)

    alignment = _randomised(
        FaithDiffAlignmentModel(lq_channels=LAST_LAYER_WIDTH, latent_channels=LATENT_WIDTH, norm_num_groups=8), 2
    ).eval()
    fallback = FaithDiffSDXLPipeline(**{**parts, "alignment": alignment})
    copied = FaithDiffSDXLPipeline(
        **{**parts, "alignment": alignment, "lq_encoder": FaithDiffLQEncoder.from_vae(vae, "last_layer").eval()}
    )
    for pipe in (fallback, copied):
        pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        assert fallback.lq_features(torch.zeros(1, 3, 16, 16)).shape == (1, LAST_LAYER_WIDTH, 2, 2)
    images = [
        pipe(lq_image, **fast_call(generator=torch.Generator().manual_seed(0))).images for pipe in (fallback, copied)
    ]
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-6)


def test_ablation_values_match_the_models_and_bad_values_are_errors() -> None:
    assert config_module.ALIGNMENT_TYPES == ALIGNMENT_TYPES
    assert config_module.LQ_FEATURE_SOURCES == FEATURE_SOURCES
    cases = [
        (lambda: FaithDiffAlignmentModel(alignment_type="mlp"), "`alignment_type`"),
        (lambda: FaithDiffAlignmentModel(lq_channels=8), "`norm_num_groups` 32 must divide `lq_channels` 8"),
        (lambda: FaithDiffAlignmentModel(alignment_type="conv_add", spatial_attention=True), "`spatial_attention"),
        (lambda: FaithDiffLQEncoder(feature_source="first_layer"), "`feature_source`"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message) as raised:
            build()
        assert "\n" not in str(raised.value)


# -------------------------------------------------------------------------------------------- training
def test_conv_add_model_trains_loads_and_runs(conv_add_stage1: Path, sdxl_base: Path) -> None:
    alignment = _config(conv_add_stage1 / "alignment")
    assert alignment["alignment_type"] == "conv_add"
    assert set(_weights(conv_add_stage1 / "alignment")) == {
        "latent_conv.weight",
        "latent_conv.bias",
        "lq_conv.weight",
        "lq_conv.bias",
    }
    assert _equal(_weights(conv_add_stage1 / "unet"), _weights(sdxl_base / "unet"))  # stage 1: frozen
    assert _weights(conv_add_stage1 / "alignment")["lq_conv.weight"].abs().sum() > 0  # moved from zero

    pipe = FaithDiffSDXLPipeline.from_pretrained(conv_add_stage1)
    assert pipe.alignment.config.alignment_type == "conv_add" and not hasattr(pipe.alignment, "blocks")
    restored = _restore(pipe)
    assert restored.shape == (1, 3, HQ, HQ) and torch.isfinite(restored).all()
    # The trained convolutions act: zeroing them changes the restoration.
    pipe.alignment.zero_init_output()
    assert (_restore(pipe) - restored).abs().max() > 0


def test_last_layer_model_trains_loads_and_runs(last_layer_stage1: Path, sdxl_base: Path) -> None:
    lq_encoder, alignment = _config(last_layer_stage1 / "lq_encoder"), _config(last_layer_stage1 / "alignment")
    assert (lq_encoder["feature_source"], lq_encoder["latent_channels"]) == ("last_layer", 4)
    assert (alignment["lq_channels"], alignment["norm_num_groups"]) == (LAST_LAYER_WIDTH, 8)
    assert alignment["alignment_type"] == "transformer"
    # The frozen LQ encoder is the whole VAE encoder, output head included.
    vae_encoder = {
        f"encoder.{k}": v
        for k, v in FaithDiffSDXLPipeline.from_pretrained(last_layer_stage1).vae.encoder.state_dict().items()
    }
    assert _equal(_weights(last_layer_stage1 / "lq_encoder"), vae_encoder)
    assert _weights(last_layer_stage1 / "alignment")["condition_embedding.conv_in.weight"].shape[1] == LAST_LAYER_WIDTH

    pipe = FaithDiffSDXLPipeline.from_pretrained(last_layer_stage1)
    assert pipe.lq_encoder.feature_channels == LAST_LAYER_WIDTH
    restored = _restore(pipe)
    assert restored.shape == (1, 3, HQ, HQ) and torch.isfinite(restored).all()


def test_stage2_with_a_frozen_lq_encoder(conv_add_stage1: Path, photos: Path, tmp_path: Path) -> None:
    """The unified-optimisation row "frozen encoder", with EMA and gradient checkpointing on."""
    settings = _settings(photos, tmp_path, freeze=["lq_encoder"], use_ema=True, ema_update_interval=1)
    result = train(TrainingConfig(stage=2, stage1_checkpoint=str(conv_add_stage1), **settings))
    stage2 = result.checkpoint / "pipeline"
    assert _equal(_weights(stage2 / "lq_encoder"), _weights(conv_add_stage1 / "lq_encoder"))
    for trained in ("unet", "alignment"):
        assert not _equal(_weights(stage2 / trained), _weights(conv_add_stage1 / trained)), trained
    assert _config(stage2 / "alignment")["alignment_type"] == "conv_add"  # the variant is continued

    # Neither the optimiser, nor accelerate's state, nor the EMA hold the frozen encoder.
    optimizer = torch.load(result.checkpoint / "optimizer.bin", weights_only=False)
    assert [group["name"] for group in optimizer["param_groups"]] == ["unet+alignment"]
    state = load_file(result.checkpoint / "model.safetensors")
    assert {key.split(".")[0] for key in state} == {"unet", "alignment"}
    ema = torch.load(result.checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    assert len(ema["shadow_params"]) == len(state)

    restored = _restore(FaithDiffSDXLPipeline.from_pretrained(stage2))
    assert torch.isfinite(restored).all()


def test_stage2_with_a_frozen_unet(last_layer_stage1: Path, photos: Path, tmp_path: Path) -> None:
    result = train(
        TrainingConfig(
            stage=2, stage1_checkpoint=str(last_layer_stage1), **_settings(photos, tmp_path, freeze=["unet"])
        )
    )
    stage2 = result.checkpoint / "pipeline"
    assert _equal(_weights(stage2 / "unet"), _weights(last_layer_stage1 / "unet"))
    for trained in ("alignment", "lq_encoder"):
        assert not _equal(_weights(stage2 / trained), _weights(last_layer_stage1 / trained)), trained
    assert _config(stage2 / "lq_encoder")["feature_source"] == "last_layer"
    optimizer = torch.load(result.checkpoint / "optimizer.bin", weights_only=False)
    assert [group["name"] for group in optimizer["param_groups"]] == ["alignment", "lq_encoder"]
    assert torch.isfinite(_restore(FaithDiffSDXLPipeline.from_pretrained(stage2))).all()


def test_stage2_without_stage1_starts_from_sdxl_with_new_modules(
    photos: Path, sdxl_base: Path, tmp_path: Path
) -> None:
    """The "w/o pre-train align" row, here also with both model switches, which shape the new modules."""
    settings = _settings(photos, tmp_path, alignment_type="conv_add", lq_feature_source="last_layer")
    start = load_starting_pipeline(
        TrainingConfig(stage=2, pretrained_model=str(sdxl_base), pretrain_alignment=False, **settings)
    )
    assert (
        start.alignment.config.alignment_type == "conv_add" and start.alignment.config.lq_channels == LAST_LAYER_WIDTH
    )
    assert all(torch.count_nonzero(p) == 0 for p in start.alignment.parameters())  # the UNet starts unchanged

    result = train(TrainingConfig(stage=2, pretrained_model=str(sdxl_base), pretrain_alignment=False, **settings))
    stage2 = result.checkpoint / "pipeline"
    assert json.loads((result.checkpoint / "training_state.json").read_text())["stage"] == 2
    assert not _equal(_weights(stage2 / "unet"), _weights(sdxl_base / "unet"))
    assert _config(stage2 / "alignment")["alignment_type"] == "conv_add"
    assert _config(stage2 / "lq_encoder")["feature_source"] == "last_layer"
    pipe = FaithDiffSDXLPipeline.from_pretrained(stage2)
    assert torch.isfinite(_restore(pipe)).all()


def test_frozen_parts_are_out_of_the_optimiser_but_carry_the_gradient() -> None:
    config = TrainingConfig(learning_rate=5e-5, lq_encoder_learning_rate=5e-6)
    expected = {
        (): [("unet+alignment", 5e-5), ("lq_encoder", 5e-6)],
        ("lq_encoder",): [("unet+alignment", 5e-5)],
        ("unet",): [("alignment", 5e-5), ("lq_encoder", 5e-6)],
        ("unet", "lq_encoder"): [("alignment", 5e-5)],
    }
    for frozen, groups in expected.items():
        pipe = FaithDiffSDXLPipeline(**tiny_components())
        module = training_module(pipe, 2, gradient_checkpointing=True, frozen=frozen)
        built = parameter_groups(module, 2, config)
        assert [(g["name"], g["lr"]) for g in built] == groups, frozen
        optimised = {id(p) for g in built for p in g["params"]}
        for name in ("unet", "alignment", "lq_encoder"):
            params = list(getattr(pipe, name).parameters())
            assert all(p.requires_grad is (name not in frozen) for p in params), (frozen, name)
            assert ({id(p) for p in params} <= optimised) is (name not in frozen), (frozen, name)
        assert optimised == {id(p) for p in module.parameters()}  # what EMA and DDP see
        # A frozen UNet still carries the gradient to the alignment module, so it stays checkpointed; a frozen
        # encoder is run without a graph.
        assert pipe.unet.is_gradient_checkpointing
        assert pipe.lq_encoder.encoder.gradient_checkpointing is ("lq_encoder" not in frozen)


# ------------------------------------------------------------------------------------------ configuration
def test_switches_from_the_command_line_and_yaml_sections(tmp_path: Path) -> None:
    args = vars(
        build_parser().parse_args(
            [
                "--stage",
                "2",
                "--freeze",
                "lq_encoder",
                "unet",
                "--pretrain-alignment",
                "false",
                "--alignment-type",
                "conv_add",
                "--lq-feature-source",
                "last_layer",
            ]
        )
    )
    stage = args.pop("stage")
    args.pop("config")
    config = TrainingConfig.from_dict(args, stage=stage)
    assert (config.freeze, config.pretrain_alignment) == (["lq_encoder", "unet"], False)
    assert (config.alignment_type, config.lq_feature_source) == ("conv_add", "last_layer")
    both = {"alignment_type": "conv_add", "stage2": {"pretrain_alignment": "no", "freeze": "unet"}}
    assert TrainingConfig.from_dict(both, stage=2).freeze == ["unet"]
    assert TrainingConfig.from_dict(both, stage=1).pretrain_alignment is True
    defaults = TrainingConfig()
    assert (defaults.alignment_type, defaults.lq_feature_source, defaults.freeze) == (None, None, [])

    # docs/training.md's "w/o pre-train align" command: the command line wins over the file's stage2 section.
    (tmp_path / "train.yaml").write_text("stage2:\n  stage1_checkpoint: runs/stage1/checkpoint-6000/pipeline\n")
    overrides = {"pretrain_alignment": "false", "stage1_checkpoint": "null"}
    config = TrainingConfig.from_yaml(tmp_path / "train.yaml", stage=2, overrides=overrides)
    assert (config.stage1_checkpoint, config.pretrain_alignment) == (None, False)
    assert TrainingConfig.from_yaml(tmp_path / "train.yaml", stage=2).stage1_checkpoint.endswith("pipeline")


def test_ablation_mistakes_are_one_line_errors(
    conv_add_stage1: Path, photos: Path, sdxl_base: Path, tmp_path: Path, capsys
) -> None:
    common = ["--train-folders", str(photos), "--hq-size", str(HQ), "--output-dir", str(tmp_path)]
    common += ["--report-to", "none", "--vae", "null", "--effective-batch-size", "null"]
    base = ["--pretrained-model", str(sdxl_base)]
    cases = {
        "alignment_type": ["--stage", "1", *base, "--alignment-type", "mlp"],
        "lq_feature_source": ["--stage", "1", *base, "--lq-feature-source", "first_layer"],
        "freeze": ["--stage", "2", "--stage1-checkpoint", str(conv_add_stage1), "--freeze", "vae"],
        "spatial_attention": ["--stage", "1", *base, "--alignment-type", "conv_add", "--spatial-attention", "true"],
        "pretrain_alignment": ["--stage", "1", *base, "--pretrain-alignment", "false"],
    }
    with_checkpoint = ["--stage", "2", "--stage1-checkpoint", str(conv_add_stage1)]
    contradictions = {
        # skipping stage 1 but naming its checkpoint; or starting "without stage 1" from a FaithDiff pipeline
        "stage1_checkpoint": [*with_checkpoint, "--pretrain-alignment", "false"],
        "pretrained_model": ["--stage", "2", "--pretrained-model", str(conv_add_stage1), "--pretrain-alignment", "0"],
        # a variant that is not the checkpoint's
        "lq_feature_source": [*with_checkpoint, "--lq-feature-source", "last_layer"],
        "alignment_type": [*with_checkpoint, "--alignment-type", "transformer"],
    }
    for name, args in [*cases.items(), *contradictions.items()]:
        assert train_main(args + common) == 2, (name, args)
        error = capsys.readouterr().err.strip()
        assert error.startswith("faithdiff-train: error:") and f"`{name}" in error and "\n" not in error, error
    assert not list(tmp_path.glob("checkpoint-*"))
    # Stage 2 from SDXL without the switch names the switch.
    assert train_main(["--stage", "2", *base, *common]) == 2
    assert "`pretrain_alignment: false`" in capsys.readouterr().err
    with pytest.raises(TrainingSetupError, match="`freeze`"):
        TrainingConfig(freeze=["alignment"], train_folders=[str(photos)]).resolve()
