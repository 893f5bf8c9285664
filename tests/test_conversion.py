"""The converter from the official release layout, and loading converted pipelines from folders and the Hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from conftest import shared_path, tiny_components
from faithdiff_pipeline import FaithDiffSDXLPipeline, convert_official_release
from faithdiff_pipeline import hub
from faithdiff_pipeline.conversion import main as convert_main

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """An official-layout release built from tiny components (state dict keys as FaithDiff.bin names them)."""
    parts = tiny_components(seed=3)
    root = tmp_path_factory.mktemp("release")
    base = FaithDiffSDXLPipeline(**{**parts, "lq_encoder": None})
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "unet"):
        getattr(base, name).save_pretrained(root / "base" / name)
    parts["vae"].save_pretrained(root / "vae")
    state = dict(parts["unet"].state_dict())
    state.update({f"denoise_encoder.{k[len('encoder.') :]}": v for k, v in parts["lq_encoder"].state_dict().items()})
    renames = {
        "condition_embedding.": "condition_embedding.",
        "blocks.": "information_transformer_layes.",
        "proj_out.": "spatial_ch_projs.",
    }
    for key, value in parts["alignment"].state_dict().items():
        prefix = next(p for p in renames if key.startswith(p))
        state[renames[prefix] + key[len(prefix) :]] = value
    torch.save(state, root / "FaithDiff.bin")
    return root


def _convert(release: Path, output: Path, **kwargs) -> Path:
    return convert_official_release(release / "FaithDiff.bin", release / "base", release / "vae", output, **kwargs)


def test_converted_weights_land_in_each_component(release, tmp_path) -> None:
    pipe = FaithDiffSDXLPipeline.from_pretrained(_convert(release, tmp_path / "out"))
    official = torch.load(release / "FaithDiff.bin", weights_only=True)
    assert torch.equal(pipe.unet.conv_in.weight, official["conv_in.weight"])
    assert torch.equal(
        pipe.lq_encoder.encoder.mid_block.resnets[0].conv1.weight,
        official["denoise_encoder.mid_block.resnets.0.conv1.weight"],
    )
    assert torch.equal(
        pipe.alignment.blocks[1].attn.in_proj_weight, official["information_transformer_layes.1.attn.in_proj_weight"]
    )
    assert torch.equal(pipe.alignment.proj_out.bias, official["spatial_ch_projs.bias"])
    assert pipe.alignment.config.lq_channels == 64 and pipe.alignment.config.latent_channels == 32
    assert pipe.lq_encoder.config.block_out_channels == [32, 32, 64, 64]
    decoder = AutoencoderKL.from_pretrained(release / "vae")
    assert torch.equal(pipe.vae.decoder.conv_out.weight, decoder.decoder.conv_out.weight)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_repository_model_index_is_the_converted_layout(release, tmp_path) -> None:
    output = _convert(release, tmp_path / "out")
    converted = json.loads((output / "model_index.json").read_text())
    ours = json.loads((REPO_ROOT / "model_index.json").read_text())
    for index in (converted, ours):
        index.pop("_diffusers_version"), index.pop("_name_or_path", None)
    assert converted == ours


def test_parity_release_converts_with_sizes_from_tensors(tmp_path) -> None:
    official = shared_path("parity", "tiny-official")
    output = convert_official_release(
        official / "FaithDiff.bin", official / "base", official / "vae-fp16-fix", tmp_path / "p"
    )
    config = json.loads((output / "alignment" / "config.json").read_text())
    assert (config["lq_channels"], config["latent_channels"], config["num_layers"], config["mlp_ratio"]) == (
        64,
        32,
        2,
        2,
    )


def test_missing_and_unexpected_keys_are_named(release, tmp_path) -> None:
    state = torch.load(release / "FaithDiff.bin", weights_only=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    del state["spatial_ch_projs.weight"]
    state["information_transformer_layes.0.extra.weight"] = torch.zeros(1)
    torch.save(state, broken / "FaithDiff.bin")
    with pytest.raises(ValueError, match=r"proj_out\.weight.*blocks\.0\.extra\.weight"):
        convert_official_release(broken, release / "base", release / "vae", tmp_path / "out")
    del state["information_transformer_layes.0.extra.weight"]
    state["spatial_ch_projs.weight"] = torch.zeros(32, 64)
    del state["conv_in.bias"]
    state["mystery.weight"] = torch.zeros(1)
    torch.save(state, broken / "FaithDiff.bin")
    with pytest.raises(ValueError, match=r"UNet.*conv_in\.bias.*mystery\.weight"):
        convert_official_release(broken, release / "base", release / "vae", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint(release, tmp_path) -> None:
    (tmp_path / "FaithDiff.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="faithdiff"):
        convert_official_release(tmp_path / "FaithDiff.bin", release / "base", release / "vae", tmp_path / "out")
    with pytest.raises(ValueError, match="holds none of"):
        convert_official_release(release / "base", release / "base", release / "vae", tmp_path / "o")


def test_never_overwrites_unless_asked(release, tmp_path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        _convert(release, output)
    assert (output / "keep.txt").read_text() == "mine"
    _convert(release, output, overwrite=True)
    assert not (output / "keep.txt").exists() and (output / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folders left behind


def test_fp16_variant_and_cli(release, tmp_path, capsys) -> None:
    output = tmp_path / "fp16"
    code = convert_main(
        [
            str(output),
            "--faithdiff",
            str(release / "FaithDiff.bin"),
            "--base",
            str(release / "base"),
            "--vae",
            str(release / "vae"),
            "--variant",
            "fp16",
        ]
    )
    assert code == 0 and "Wrote" in capsys.readouterr().out
    assert (output / "alignment" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    pipe = FaithDiffSDXLPipeline.from_pretrained(output, variant="fp16", dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
    code = convert_main(
        [
            str(output),
            "--faithdiff",
            str(release / "FaithDiff.bin"),
            "--base",
            str(release / "base"),
            "--vae",
            str(release / "vae"),
        ]
    )
    assert code == 2 and "already exists" in capsys.readouterr().err


def test_hub_ids_load_through_a_snapshot(release, tmp_path, monkeypatch) -> None:
    """A file-based Hub stand-in: repository ids resolve to folders under a local root, honouring allow_patterns."""
    hub_root = tmp_path / "hub"
    _convert(release, hub_root / "someone" / "faithdiff")
    FaithDiffSDXLPipeline.from_pretrained(hub_root / "someone" / "faithdiff").to(torch.float16).save_pretrained(
        hub_root / "someone" / "faithdiff", variant="fp16"
    )
    requests = []

    def fake_snapshot_download(repo_id, allow_patterns, cache_dir=None, revision=None, **kwargs):
        import fnmatch

        requests.append((repo_id, revision))
        source = hub_root / repo_id
        if not source.is_dir():
            raise FileNotFoundError(f"Repository {repo_id} not found")
        target = Path(cache_dir) / repo_id.replace("/", "--")
        for path in source.rglob("*"):
            relative = path.relative_to(source).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(relative, pattern) for pattern in allow_patterns):
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / relative)
        return str(target)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    cache = tmp_path / "cache"
    pipe = FaithDiffSDXLPipeline.from_pretrained(
        "someone/faithdiff", cache_dir=cache, revision="main", variant="fp16", dtype=torch.float16
    )
    assert requests == [("someone/faithdiff", "main")]
    assert pipe.alignment.dtype == torch.float16
    downloaded = {p.name for p in (cache / "someone--faithdiff" / "unet").iterdir()}
    assert downloaded == {"config.json", "diffusion_pytorch_model.fp16.safetensors"}
    full = FaithDiffSDXLPipeline.from_pretrained("someone/faithdiff", cache_dir=tmp_path / "cache2")
    assert full.unet.dtype == torch.float32
    assert {p.name for p in (tmp_path / "cache2" / "someone--faithdiff" / "unet").iterdir()} == {
        "config.json",
        "diffusion_pytorch_model.safetensors",
    }


def test_folder_that_is_not_a_faithdiff_pipeline(release, tmp_path) -> None:
    with pytest.raises(ValueError, match="no model_index.json"):
        FaithDiffSDXLPipeline.from_pretrained(release / "base")
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    with pytest.raises(ValueError, match=r"StableDiffusionXLPipeline.*alignment"):
        FaithDiffSDXLPipeline.from_pretrained(tmp_path)
