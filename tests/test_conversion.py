"""The converter from the official release layout, and loading converted pipelines from folders and the Hub."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

from shared_data import shared_path

from tiny_models import tiny_components
from faithdiff_pipeline import FaithDiffSDXLPipeline, convert_official_release, converted_release
from faithdiff_pipeline import conversion, hub
from faithdiff_pipeline.conversion import load_official_checkpoint
from faithdiff_pipeline.conversion import main as convert_main

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ("parity", "tiny-official")


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
    # The files diffusers' custom-code layout names (tests/test_diffusers_loading.py loads them with plain diffusers).
    written = {
        "pipeline_faithdiff_sdxl.py": "FaithDiffSDXLPipeline",
        "alignment/faithdiff_alignment.py": "FaithDiffAlignmentModel",
        "lq_encoder/faithdiff_lq_encoder.py": "FaithDiffLQEncoder",
    }
    # And the file of diffusers' modular pipelines (tests/test_modular.py loads it with ModularPipeline).
    modular = {"modular_blocks_faithdiff_sdxl.py": "FaithDiffSDXLAutoBlocks"}
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob("*.py")) == sorted({**written, **modular})
    for relative, class_name in written.items():
        assert (output / relative).read_text() == hub.custom_code_source(class_name)
    for relative, class_name in modular.items():
        assert (output / relative).read_text() == hub.custom_code_source(class_name, hub.MODULAR_LOADER)


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
    output = _convert(release, tmp_path / "out")
    (output / "notes.txt").write_text("a converted pipeline of ours")
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        _convert(release, output)
    assert (output / "notes.txt").is_file()
    _convert(release, output, overwrite=True)
    assert not (output / "notes.txt").exists()
    assert (output / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folders left behind


@pytest.mark.parametrize("index", [None, "not json", '{"_class_name": "StableDiffusionXLPipeline"}'])
def test_overwrite_replaces_only_a_faithdiff_pipeline_folder(release, tmp_path, index) -> None:
    """`--overwrite` replaces a pipeline folder of ours, never a folder of anything else (an SDXL base, photos)."""
    output = tmp_path / "mine"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    if index is not None:
        (output / "model_index.json").write_text(index)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is not a FaithDiff pipeline folder"):
            _convert(release, output, overwrite=overwrite)
    assert (output / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    # An empty folder holds nothing to lose.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (_convert(release, empty, overwrite=True) / "model_index.json").is_file()


def test_convert_names_the_users_folder_in_its_errors(release, tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"`output_dir` .*file/out.* cannot be created: .*file.* is a file"):
        _convert(release, tmp_path / "file" / "out")

    def full_disk(self, folder, **kwargs) -> None:
        raise OSError(28, "No space left on device", str(Path(folder) / "unet" / "model.safetensors"))

    monkeypatch.setattr(FaithDiffSDXLPipeline, "save_pretrained", full_disk)
    output = tmp_path / "new" / "pipeline"
    assert convert_main(_faithdiff_args(release, release / "FaithDiff.bin", output)) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of the loading
    assert error.startswith("faithdiff-convert: error: ")
    assert str(output) in error and "No space left on device" in error
    assert "staging" not in error
    assert not output.exists()


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
    # The snapshot is a complete folder in diffusers' custom-code layout, for plain diffusers as well.
    assert (cache / "someone--faithdiff" / "pipeline_faithdiff_sdxl.py").is_file()
    assert (cache / "someone--faithdiff" / "alignment" / "faithdiff_alignment.py").is_file()
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


# --- Unsafe, truncated and malformed checkpoints --------------------------------------------------------------------


class _RunsCode:
    """Unpickling this runs a shell command that creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _faithdiff_args(release: Path, checkpoint: Path, output: Path) -> list[str]:
    return [str(output), "--faithdiff", str(checkpoint), "--base", str(release / "base"), "--vae", str(release / "vae")]


def _one_error_line(capsys) -> str:
    """The command's only stderr line besides the progress bars of model loading (redrawn with carriage returns)."""
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line and "\r" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on pickle.dump's newer protocol
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(writer, release, tmp_path, capsys) -> None:
    marker = tmp_path / "code-ran"
    state = {"conv_in.weight": torch.zeros(1), "payload": _RunsCode(marker)}
    checkpoint = tmp_path / "FaithDiff.bin"
    if writer == "torch.save":
        torch.save(state, checkpoint)
    else:
        with open(checkpoint, "wb") as handle:
            pickle.dump(state, handle)
    # The file really is malicious: unpickling it without torch's restrictions runs its command.
    if writer == "torch.save":
        torch.load(checkpoint, weights_only=False)
    else:
        with open(checkpoint, "rb") as handle:
            pickle.load(handle)
    assert marker.exists()
    marker.unlink()
    assert convert_main(_faithdiff_args(release, checkpoint, tmp_path / "out")) == 2
    err = _one_error_line(capsys)
    assert re.search(r"refused as unsafe: it is not a plain state dict.*may run code", err)
    assert "weights_only" not in err
    # torch names the refused function only for its own format (its weights-only reader stops earlier on others).
    assert (f"{os.system.__module__}.system" in err) == (writer == "torch.save")
    assert not marker.exists() and not (tmp_path / "out").exists()


def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncated_archive(release: Path, path: Path) -> None:
    shutil.copyfile(release / "FaithDiff.bin", path)
    _cut_in_half(path)


def _truncated_legacy_pickle(release: Path, path: Path) -> None:
    torch.save({"a": torch.zeros(64)}, path, _use_new_zipfile_serialization=False)
    _cut_in_half(path)


def _truncated_safetensors(release: Path, path: Path) -> None:
    save_file({"a": torch.zeros(64, 64)}, path)
    _cut_in_half(path)


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("FaithDiff.bin", _truncated_archive, r"not a readable PyTorch checkpoint \(truncated or corrupt\?\): Pytorch"),
        ("legacy.bin", _truncated_legacy_pickle, r"not a readable PyTorch checkpoint \(truncated or corrupt\?\)"),
        ("empty.bin", lambda release, path: path.write_bytes(b""), r"not a PyTorch checkpoint: it is neither"),
        ("list.bin", lambda release, path: torch.save([torch.zeros(1)], path), r"holds a list, not a state dict"),
        ("tensor.bin", lambda release, path: torch.save(torch.zeros(2), path), r"holds a Tensor, not a state dict"),
        (
            "values.bin",
            lambda release, path: torch.save({"a": torch.zeros(1), "b": 3}, path),
            r"not a state dict of tensors: 'b' is a int",
        ),
        ("FaithDiff.safetensors", _truncated_safetensors, r"not a readable safetensors file \(truncated or corrupt"),
        ("header.safetensors", lambda release, path: path.write_bytes(b"\x00" * 3), r"not a readable safetensors file"),
    ],
    ids=["truncated", "truncated-legacy", "empty", "list", "tensor", "not-tensors", "truncated-st", "corrupt-st"],
)
def test_broken_checkpoints_are_one_line_errors(name, make, message, release, tmp_path, capsys) -> None:
    checkpoint = tmp_path / name
    make(release, checkpoint)
    with pytest.raises(ValueError, match=message):
        load_official_checkpoint(checkpoint)
    assert convert_main(_faithdiff_args(release, checkpoint, tmp_path / "out")) == 2
    assert re.match(r"faithdiff-convert: error: `faithdiff` .*" + message, _one_error_line(capsys))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["pre-1.6 pickle", "safetensors"])
def test_plain_state_dicts_in_other_formats_load(fmt, release, tmp_path) -> None:
    state = torch.load(release / "FaithDiff.bin", weights_only=True)
    if fmt == "safetensors":
        path = tmp_path / "FaithDiff.safetensors"
        save_file({key: value.contiguous() for key, value in state.items()}, path)
    else:
        path = tmp_path / "FaithDiff.bin"
        torch.save(state, path, _use_new_zipfile_serialization=False)
    loaded = load_official_checkpoint(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[key], state[key]) for key in state)


# --- Sizes checked at conversion ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_state() -> dict[str, torch.Tensor]:
    return torch.load(shared_path(*OFFICIAL) / "FaithDiff.bin", weights_only=True)


def _edited_copy(source: Path, target: Path, config: str, **changes) -> Path:
    """A writable copy of ``source`` (the shared files are read-only) with ``changes`` made to its ``config``."""
    shutil.copytree(source, target, copy_function=shutil.copyfile)
    values = json.loads((target / config).read_text())
    (target / config).write_text(json.dumps({**values, **changes}))
    return target


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"denoise_encoder.conv_in.weight": (32, 4, 3, 3)}, r"LQ encoder's conv_in takes 4 channels, not RGB's 3"),
        (
            {"condition_embedding.conv_in.weight": (64, 32, 3, 3)},
            r"alignment module's lq_channels \(32\) must equal the LQ encoder's output \(mid-block\) width.*\(64\)",
        ),
        (
            {"condition_embedding.conv_out.weight": (16, 64, 3, 3)},
            r"alignment module's latent_channels \(16\) must equal the UNet's conv_in output width.*\(32\)",
        ),
        ({"denoise_encoder.down_blocks.3.": None}, r"LQ encoder has 3 down blocks but the VAE 4"),
        ({"conv_in.weight": (32, 8, 3, 3)}, r"tensors for the SDXL UNet.*conv_in\.weight \(32, 8, 3, 3\) instead of"),
        ({"denoise_encoder.conv_in.weight": None}, r"lacks the LQ-encoder weight 'encoder\.conv_in\.weight'"),
    ],
    ids=["lq-input-channels", "lq-channels", "latent-channels", "lq-down-blocks", "unet-conv-in", "lq-conv-in-gone"],
)
def test_mismatched_tensors_are_found_at_conversion(changes, message, official_state, tmp_path) -> None:
    """Each case alters (a shape) or removes (None: every key with that prefix) tensors of the tiny release."""
    official = shared_path(*OFFICIAL)
    state = dict(official_state)
    for key, shape in changes.items():
        if shape is None:
            state = {name: value for name, value in state.items() if not name.startswith(key)}
        else:
            state[key] = torch.randn(shape)
    torch.save(state, tmp_path / "FaithDiff.bin")
    with pytest.raises(ValueError, match=message):
        convert_official_release(
            tmp_path / "FaithDiff.bin", official / "base", official / "vae-fp16-fix", tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()


def test_mismatched_configs_are_found_at_conversion(tmp_path) -> None:
    official = shared_path(*OFFICIAL)
    checkpoint, base, vae = official / "FaithDiff.bin", official / "base", official / "vae-fp16-fix"
    output = tmp_path / "o"
    wide_vae = _edited_copy(vae, tmp_path / "vae8", "config.json", latent_channels=8)
    with pytest.raises(ValueError, match=r"UNet's in_channels \(4\) must equal the VAE's latent_channels \(8\)"):
        convert_official_release(checkpoint, base, wide_vae, output)
    cross = _edited_copy(base, tmp_path / "cross", "unet/config.json", cross_attention_dim=96)
    with pytest.raises(ValueError, match=r"cross_attention_dim \(96\) must equal .*hidden_size \(32 \+ 32 = 64\)"):
        convert_official_release(checkpoint, cross, vae, output)
    pooled = _edited_copy(base, tmp_path / "pooled", "text_encoder_2/config.json", projection_dim=16)
    with pytest.raises(ValueError, match=r"projection_class_embeddings_input_dim \(80\) .*\(16 \+ 48 = 64\)"):
        convert_official_release(checkpoint, pooled, vae, output)
    with pytest.raises(ValueError, match=r"2 x latent_channels \(64\) must be divisible by its 7 attention heads"):
        convert_official_release(checkpoint, base, vae, output, num_attention_heads=7)
    untuned = _edited_copy(base, tmp_path / "tok", "tokenizer_2/tokenizer_config.json")
    (untuned / "tokenizer_2" / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer_2 pads prompts to \d+ tokens but text_encoder_2 has 77 posit"):
        convert_official_release(checkpoint, untuned, vae, output)
    assert not output.exists()


# --- Leftovers, modes and interruptions -----------------------------------------------------------------------------


def test_leftovers_of_an_interrupted_conversion_are_removed(release, tmp_path) -> None:
    ours = [".out.faithdiff-staging-0badc0de", ".out.faithdiff-retired", ".out.old"]
    others = [".out.keep", ".other.faithdiff-staging-0badc0de", ".out.1234abcd", ".outer.faithdiff-retired", ".o.old"]
    for name in ours + others:
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.safetensors").write_text("left behind")
    _convert(release, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *others])


def test_interrupted_conversion_exits_130_and_removes_its_staging_folder(release, tmp_path, monkeypatch, capsys):
    staged = []

    def interrupted_save(self, folder, **kwargs) -> None:
        staged.append(Path(folder))
        (Path(folder) / "model_index.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(FaithDiffSDXLPipeline, "save_pretrained", interrupted_save)
    output = tmp_path / "out"
    assert convert_main(_faithdiff_args(release, release / "FaithDiff.bin", output)) == 130
    assert _one_error_line(capsys).startswith("faithdiff-convert: interrupted")
    assert staged[0].parent == tmp_path and re.fullmatch(r"\.out\.faithdiff-staging-[0-9a-f]{8}", staged[0].name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)], ids=["umask-022", "umask-027"]
)
def test_converted_folder_gets_the_umask_mode(umask, folder_mode, file_mode, release, tmp_path) -> None:
    previous = os.umask(umask)
    try:
        output = _convert(release, tmp_path / "out")
    finally:
        os.umask(previous)
    paths = [output, *output.rglob("*")]
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()} == {folder_mode}
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()} == {file_mode}


# --- The Hub unreachable, and local paths that do not exist ---------------------------------------------------------


def _hub_behind_a_closed_port(monkeypatch, tmp_path: Path) -> None:
    """The offline flag unset and the Hub endpoint at a local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    # huggingface_hub reads its environment once, at import: its constants are what its functions look at.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.mark.parametrize("hub_state, reason", [("offline", "HF_HUB_OFFLINE is set"), ("closed port", "refused")])
def test_unreachable_hub_fails_fast_with_one_clear_error(hub_state, reason, tmp_path, monkeypatch, capsys) -> None:
    if hub_state == "closed port":
        _hub_behind_a_closed_port(monkeypatch, tmp_path)
    else:
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"Hugging Face Hub could not be reached") as converting:
        converted_release(cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"Hugging Face Hub could not be reached") as loading:
        FaithDiffSDXLPipeline.from_pretrained("someone/not-cached")
    assert convert_main([str(tmp_path / "out")]) == 2
    # An upper bound against retries and hangs (huggingface_hub alone takes about half a minute), not a benchmark.
    assert time.monotonic() - start < 15
    assert "could not be reached" in _one_error_line(capsys)
    for error, instead in ((converting, "--model FOLDER"), (loading, "from_pretrained(FOLDER)")):
        message = str(error.value)
        assert reason in message and instead in message and "\n" not in message
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_local_paths_that_do_not_exist_are_not_taken_for_hub_ids(release, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("./missing", tmp_path / "missing", "~/missing", "someone/models/faithdiff"):
        with pytest.raises(ValueError, match=r"`pretrained_model_name_or_path` .* does not exist"):
            FaithDiffSDXLPipeline.from_pretrained(name)
    with pytest.raises(ValueError, match=r"`pretrained_model_name_or_path` .* is a file"):
        FaithDiffSDXLPipeline.from_pretrained(release / "FaithDiff.bin")
    checkpoint, base, vae, output = release / "FaithDiff.bin", release / "base", release / "vae", tmp_path / "out"
    with pytest.raises(ValueError, match=r"`base` '\./missing-base' does not exist"):
        convert_official_release(checkpoint, "./missing-base", vae, output)
    with pytest.raises(ValueError, match=r"`faithdiff` 'someone/FaithDiff\.bin' does not exist"):
        convert_official_release("someone/FaithDiff.bin", base, vae, output)
    with pytest.raises(ValueError, match=r"`vae` .* is a file"):
        convert_official_release(checkpoint, base, checkpoint, output)


# --- Imports ------------------------------------------------------------------------------------------------------

HEAVY_MODULES = ("torch", "diffusers", "transformers", "safetensors", "huggingface_hub")


def test_conversion_imports_nothing_heavy_at_module_level() -> None:
    """The package's own submodules count as heavy: they import torch and diffusers."""
    tree = ast.parse(Path(conversion.__file__).read_text(encoding="utf-8"))
    imported = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    imported += ["." * node.level + (node.module or "") for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert [name for name in imported if name.startswith(".") or name.split(".")[0] in HEAVY_MODULES] == []


def test_help_loads_neither_torch_nor_diffusers() -> None:
    # The module is loaded from its file, not through the package, whose __init__ is not this module's to keep lean.
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("faithdiff_pipeline.conversion", {conversion.__file__!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            module.main(["--help"])
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        print("loaded:", [name for name in {HEAVY_MODULES!r} if name in sys.modules])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: faithdiff-convert" in result.stdout and "loaded: []" in result.stdout
