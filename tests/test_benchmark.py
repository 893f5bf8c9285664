"""The benchmark script runs end to end on CPU with tiny components, beside an anchor module, printing JSON lines."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"

TINY_CONFIGS = {
    "unet": dict(
        block_out_channels=[32, 64],
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=[1, 2],
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    ),
    "vae": dict(
        block_out_channels=[32, 32, 64, 64],
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        scaling_factor=0.13025,
        force_upcast=False,
    ),
    "text_encoder": dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    ),
    "text_encoder_2": dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    ),
    "scheduler": dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    ),
}

ANCHOR = '''
"""A stand-in with the community pipeline's interface, delegating to FaithDiffSDXLPipeline."""
from diffusers import UNet2DConditionModel as _UNet
from faithdiff_pipeline import FaithDiffAlignmentModel, FaithDiffSDXLPipeline

CALLS = []


class UNet2DConditionModel(_UNet):
    def load_additional_layers(self, weight_path=None, dtype=None):
        self.alignment = FaithDiffAlignmentModel(lq_channels=64, latent_channels=32).to(dtype=dtype)


class FaithDiffStableDiffusionXLPipeline:
    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler):
        self.pipe = FaithDiffSDXLPipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, unet.alignment, scheduler)

    def to(self, device):
        self.pipe.to(device)
        return self

    def set_progress_bar_config(self, **kwargs):
        self.pipe.set_progress_bar_config(**kwargs)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    def set_encoder_tile_settings(self):
        pass

    def __call__(self, lr_img, prompt, negative_prompt, num_inference_steps, guidance_scale, generator, start_point,
                 height, width, overlap, target_size):
        CALLS.append((lr_img.size, height, width, num_inference_steps, target_size))
        return self.pipe(lr_img, prompt=prompt, upscale=1, num_inference_steps=num_inference_steps,
                         tile_size=target_size[0], generator=generator)
'''


@pytest.fixture
def benchmark_module():
    spec = importlib.util.spec_from_file_location("faithdiff_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_ours_and_the_anchor_on_cpu(benchmark_module, tmp_path, capsys) -> None:
    config = tmp_path / "configs.json"
    config.write_text(json.dumps(TINY_CONFIGS))
    anchor = tmp_path / "anchor_pipeline.py"
    anchor.write_text(ANCHOR)
    output = tmp_path / "results.jsonl"
    code = benchmark_module.main(
        [
            "--config",
            str(config),
            "--sizes",
            "64",
            "128",
            "--tile-size",
            "64",
            "--tile-batch-size",
            "1",
            "3",
            "--steps",
            "2",
            "--warmup-steps",
            "1",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--vae-tiling-from",
            "128",
            "--anchor",
            str(anchor),
            "--output",
            str(output),
            "--breakdown",
        ]
    )
    assert code == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == [json.loads(line) for line in output.read_text().splitlines()]
    assert "torch" in printed[0]["environment"]
    anchor_runs = [r for r in printed if r.get("pipeline", "").startswith("anchor:")]
    ours = [r for r in printed if r.get("pipeline") == "faithdiff_pipeline" and "size" in r]
    assert [(r["size"], r["vae_tiling"]) for r in anchor_runs] == [(64, False), (128, True)]
    assert [(r["size"], r["tile_batch_size"]) for r in ours] == [(64, 1), (64, 3), (128, 1), (128, 3)]
    assert all(r["seconds"] > 0 for r in anchor_runs + ours)
    stages = ours[0]["stages"]
    assert set(stages) == {"encode_prompt", "lq_features", "prepare_latents", "predict_noise", "decode_latents"}
    assert all(seconds > 0 for seconds in stages.values())
    # Batching tiles changes nothing but speed: the outputs agree with the one-tile-per-call run.
    assert all(r["max_abs_diff_vs_first_tile_batch_size"] < 1e-4 for r in ours)


def test_anchor_module_must_expose_the_pipeline(benchmark_module, tmp_path) -> None:
    module = tmp_path / "not_a_pipeline.py"
    module.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no `FaithDiffStableDiffusionXLPipeline`"):
        benchmark_module.load_anchor(module)


def test_benchmark_measures_float8_against_the_exact_path(benchmark_module, tmp_path, capsys) -> None:
    config = tmp_path / "configs.json"
    config.write_text(json.dumps(TINY_CONFIGS))
    common = ["--config", str(config), "--sizes", "64", "--tile-size", "64", "--steps", "2", "--warmup-steps", "0"]
    common += ["--device", "cpu", "--dtype", "float32"]
    assert benchmark_module.main([*common, "--fp8", "weights"]) == 0
    assert benchmark_module.main([*common, "--low-vram"]) == 0
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"pipeline"')]
    assert [(r["fp8"], r["low_vram"]) for r in runs] == [("weights", False), ("none", True)]
    for record in runs:
        # Float8 weights move the output, but not to noise.
        assert 0 < record["max_abs_vs_exact"] < 1 and record["psnr_vs_exact"] > 10
