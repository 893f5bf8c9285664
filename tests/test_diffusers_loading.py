"""Plain diffusers loads our folders through its custom-code mechanism, and our own loader never runs their code.

Plain-diffusers loading runs in a child process that imports only diffusers (and, when the test says so, cannot
import faithdiff_pipeline at all), with its own modules cache, so that what diffusers imports and copies stays there.
Hub repositories come from a file-based stand-in, as in test_conversion.py: folders under a local root.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import fast_call, tiny_components
from faithdiff_pipeline import FaithDiffSDXLPipeline, hub

CUSTOM_CODE = {
    "pipeline_faithdiff_sdxl.py": "FaithDiffSDXLPipeline",
    "alignment/faithdiff_alignment.py": "FaithDiffAlignmentModel",
    "lq_encoder/faithdiff_lq_encoder.py": "FaithDiffLQEncoder",
}
REPO_ID = "someone/faithdiff"

# Run by the child process: json arguments in argv[1], the outcome of each load written to args["result"].
CHILD = r'''
import importlib.util
import json
import os
import shutil
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

args = json.loads(sys.argv[1])
fetched = []

if args["hide_package"]:
    # As if faithdiff-pipeline were not installed: its editable install is a path entry.
    sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "faithdiff_pipeline"))]
    importlib.invalidate_caches()

if args["hub_root"]:
    # The Hub stand-in, installed where diffusers imports these functions from, before diffusers is imported.
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    root = Path(args["hub_root"])

    def repo_files(repo_id):
        folder = root / repo_id
        if not folder.is_dir():
            raise FileNotFoundError(f"Repository {repo_id} not found")
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    def snapshot(repo_id, cache_dir):
        return Path(cache_dir or args["cache"]) / repo_id.replace("/", "--")

    def fetch(repo_id, relative, cache_dir):
        target = snapshot(repo_id, cache_dir) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / repo_id / relative, target)
        fetched.append(relative)
        return str(target)

    def model_info(repo_id, revision=None, token=None, **kwargs):
        files = repo_files(repo_id)
        return SimpleNamespace(sha="0" * 40, siblings=[SimpleNamespace(rfilename=name) for name in files])

    def hf_hub_download(repo_id, filename, subfolder=None, cache_dir=None, **kwargs):
        return fetch(repo_id, f"{subfolder}/{filename}" if subfolder else filename, cache_dir)

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, cache_dir=None, **kwargs):
        files = filter_repo_objects(repo_files(repo_id), allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        for relative in files:
            fetch(repo_id, relative, cache_dir)
        return str(snapshot(repo_id, cache_dir))

    def resolve_revision(repo_id, revision=None, **kwargs):
        return revision

    for function in (model_info, hf_hub_download, snapshot_download, resolve_revision):
        setattr(huggingface_hub, function.__name__, function)

reachable = importlib.util.find_spec("faithdiff_pipeline") is not None
import torch
from diffusers import DiffusionPipeline

outcomes = []
for trust in (False, True):
    imported_before = "faithdiff_pipeline" in sys.modules
    kwargs = {"trust_remote_code": trust}
    if args["hub_root"]:
        kwargs["cache_dir"] = args["cache"]
    if args["fp16"]:
        kwargs.update(variant="fp16", dtype=torch.float16)
    try:
        pipe = DiffusionPipeline.from_pretrained(args["source"], **kwargs)
    except Exception as error:
        outcomes.append({"error": type(error).__name__, "message": str(error), "imported_before": imported_before})
        continue
    components = {name: f"{type(c).__module__}.{type(c).__qualname__}" for name, c in pipe.components.items()}
    outcome = {
        "class": f"{type(pipe).__module__}.{type(pipe).__qualname__}",
        "components": components,
        "dtype": str(pipe.alignment.dtype),
        "imported_before": imported_before,
    }
    if args["image"]:
        from PIL import Image

        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        call = {**args["call"], "generator": generator}
        torch.save(pipe(Image.open(args["image"]), **call).images, args["output"])
    outcomes.append(outcome)

Path(args["result"]).write_text(json.dumps({"reachable": reachable, "outcomes": outcomes, "fetched": fetched}))
'''


def _load_with_plain_diffusers(
    tmp_path: Path,
    source: str | Path,
    *,
    hide_package: bool = False,
    hub_root: Path | None = None,
    fp16: bool = False,
    image: Path | None = None,
) -> tuple[dict, str]:
    """Runs :data:`CHILD`: ``DiffusionPipeline.from_pretrained(source)`` without, then with ``trust_remote_code``.

    Returns its result and its stderr (where diffusers logs its warnings)."""
    work = tmp_path / "child"
    work.mkdir()
    script = work / "load.py"
    script.write_text(CHILD)
    args = {
        "source": str(source),
        "hide_package": hide_package,
        "hub_root": str(hub_root) if hub_root else None,
        "cache": str(work / "hub-cache"),
        "fp16": fp16,
        "image": str(image) if image else None,
        "call": fast_call(),
        "output": str(work / "images.pt"),
        "result": str(work / "result.json"),
    }
    env = {**os.environ, "HF_HOME": str(work / "hf-home"), "HF_MODULES_CACHE": str(work / "modules")}
    # Every Hub function diffusers calls is the stand-in's: anything else must fail at once.
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("DIFFUSERS_DISABLE_REMOTE_CODE", None)
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(args)], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((work / "result.json").read_text()), done.stderr


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny pipeline as save_pretrained writes it."""
    folder = tmp_path_factory.mktemp("saved") / "faithdiff"
    pipe = FaithDiffSDXLPipeline(**tiny_components())
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hub_root(saved, tmp_path_factory) -> Path:
    """The stand-in Hub: ``someone/faithdiff`` with full-precision and fp16 weights."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / REPO_ID
    shutil.copytree(saved, repo)
    FaithDiffSDXLPipeline.from_pretrained(saved).to(torch.float16).save_pretrained(repo, variant="fp16")
    return root


def test_saved_folders_use_diffusers_custom_code_layout(saved) -> None:
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_faithdiff_sdxl", "FaithDiffSDXLPipeline"]
    assert index["alignment"] == ["faithdiff_alignment", "FaithDiffAlignmentModel"]
    assert index["lq_encoder"] == ["faithdiff_lq_encoder", "FaithDiffLQEncoder"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    for relative, class_name in CUSTOM_CODE.items():
        source = (saved / relative).read_text()
        assert source == hub.custom_code_source(class_name)
        # What diffusers runs with trust_remote_code: one import of the installed package, nothing else.
        imports = [node for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert [(node.module, [alias.name for alias in node.names]) for node in imports] == [
            ("faithdiff_pipeline", [class_name])
        ]


def test_plain_diffusers_loads_a_folder_with_our_package(saved, lq_image, tmp_path) -> None:
    image = tmp_path / "lq.png"
    lq_image.save(image)
    result, _ = _load_with_plain_diffusers(tmp_path, saved, image=image)
    refused, loaded = result["outcomes"]
    assert refused["error"] == "ValueError" and "trust_remote_code=True" in refused["message"]
    assert "pipeline_faithdiff_sdxl.py" in refused["message"]
    # diffusers imported our package itself, through the folder's file, and returned our own classes.
    assert not refused["imported_before"]
    assert loaded["class"] == "faithdiff_pipeline.pipeline_faithdiff_sdxl.FaithDiffSDXLPipeline"
    assert loaded["components"]["alignment"] == "faithdiff_pipeline.alignment.FaithDiffAlignmentModel"
    assert loaded["components"]["lq_encoder"] == "faithdiff_pipeline.lq_features.FaithDiffLQEncoder"
    ours = FaithDiffSDXLPipeline.from_pretrained(saved)
    ours.set_progress_bar_config(disable=True)
    expected = ours(lq_image, generator=torch.Generator().manual_seed(0), **fast_call()).images
    # Same weights; the last float32 bits may differ between processes (BLAS kernels depend on memory alignment).
    torch.testing.assert_close(torch.load(tmp_path / "child" / "images.pt"), expected, rtol=0, atol=1e-5)


def test_plain_diffusers_loads_a_hub_id_with_our_package(hub_root, tmp_path) -> None:
    result, _ = _load_with_plain_diffusers(tmp_path, REPO_ID, hub_root=hub_root, fp16=True)
    refused, loaded = result["outcomes"]
    assert refused["error"] == "ValueError" and "trust_remote_code=True" in refused["message"]
    assert loaded["class"] == "faithdiff_pipeline.pipeline_faithdiff_sdxl.FaithDiffSDXLPipeline"
    assert loaded["components"]["alignment"] == "faithdiff_pipeline.alignment.FaithDiffAlignmentModel"
    assert loaded["dtype"] == "torch.float16"
    fetched = set(result["fetched"])
    assert set(CUSTOM_CODE) <= fetched
    weights = {name for name in fetched if name.endswith(".safetensors")}
    assert weights and all(".fp16." in name for name in weights)  # only the requested variant was downloaded


@pytest.mark.parametrize("where", ["folder", "hub"])
def test_plain_diffusers_without_our_package_says_what_to_install(where, saved, hub_root, tmp_path) -> None:
    source = saved if where == "folder" else REPO_ID
    result, stderr = _load_with_plain_diffusers(
        tmp_path, source, hide_package=True, hub_root=hub_root if where == "hub" else None
    )
    assert not result["reachable"]  # the package really was out of reach
    refused, failed = result["outcomes"]
    assert refused["error"] == "ValueError" and "trust_remote_code=True" in refused["message"]
    assert failed["error"] == "ImportError"
    assert "pip install faithdiff-pipeline" in failed["message"] and "FaithDiffSDXLPipeline" in failed["message"]
    # diffusers' own warning names the missing module too.
    assert "not found in your environment: faithdiff_pipeline" in stderr


def test_our_loader_never_runs_the_folders_code(saved, tmp_path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    marker = tmp_path / "ran"
    for relative in CUSTOM_CODE:
        (folder / relative).write_text(f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('ran')\n")
    pipe = FaithDiffSDXLPipeline.from_pretrained(folder)
    assert not marker.exists()
    assert type(pipe).__module__ == "faithdiff_pipeline.pipeline_faithdiff_sdxl"
    assert type(pipe.alignment).__module__ == "faithdiff_pipeline.alignment"
    assert type(pipe.lq_encoder).__module__ == "faithdiff_pipeline.lq_features"
    # The index as this class reads it, in every return form of load_config.
    config, _ = FaithDiffSDXLPipeline.load_config(folder, return_unused_kwargs=True)
    assert config["_class_name"] == "FaithDiffSDXLPipeline"
    assert config["alignment"] == ["faithdiff_pipeline.alignment", "FaithDiffAlignmentModel"]
    assert config["lq_encoder"] == ["faithdiff_pipeline.lq_features", "FaithDiffLQEncoder"]


def test_folders_from_before_the_custom_code_layout_still_load(saved, tmp_path) -> None:
    folder = tmp_path / "old"
    shutil.copytree(saved, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        _class_name="FaithDiffSDXLPipeline",
        alignment=["faithdiff_pipeline.alignment", "FaithDiffAlignmentModel"],
        lq_encoder=["faithdiff_pipeline.lq_features", "FaithDiffLQEncoder"],
    )
    (folder / "model_index.json").write_text(json.dumps(index))
    for relative in CUSTOM_CODE:
        (folder / relative).unlink()
    pipe = FaithDiffSDXLPipeline.from_pretrained(folder)
    assert type(pipe.alignment).__name__ == "FaithDiffAlignmentModel" and pipe.lq_encoder is not None


class _OwnPipeline(FaithDiffSDXLPipeline):
    """A subclass defined outside the package, which the custom-code file could not import."""


def test_a_subclass_keeps_its_own_class_name(tmp_path) -> None:
    _OwnPipeline(**tiny_components()).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "_OwnPipeline" and not (tmp_path / "pipeline_faithdiff_sdxl.py").exists()
    assert index["alignment"] == ["faithdiff_alignment", "FaithDiffAlignmentModel"]
    assert type(_OwnPipeline.from_pretrained(tmp_path)) is _OwnPipeline


def test_push_to_hub_uploads_the_complete_folder(tmp_path, monkeypatch) -> None:
    uploads = []

    def fake_upload_folder(repo_id, folder_path, token, commit_message, create_pr):
        index = json.loads((Path(folder_path) / "model_index.json").read_text())
        present = {relative for relative in CUSTOM_CODE if (Path(folder_path) / relative).is_file()}
        uploads.append((repo_id, commit_message, create_pr, index["_class_name"], present))

    class FakeCard:
        def save(self, path: str) -> None:
            Path(path).write_text("card")

    monkeypatch.setattr(hub, "create_repo", lambda repo_id, **kwargs: type("Repo", (), {"repo_id": repo_id}))
    monkeypatch.setattr(hub, "upload_folder", fake_upload_folder)
    monkeypatch.setattr("diffusers.utils.hub_utils.load_or_create_model_card", lambda *args, **kwargs: FakeCard())
    monkeypatch.setattr("diffusers.utils.hub_utils.populate_model_card", lambda card, **kwargs: card)
    FaithDiffSDXLPipeline(**tiny_components()).save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="me/fd")
    # At upload time the folder already held the custom-code layout.
    layout = (["pipeline_faithdiff_sdxl", "FaithDiffSDXLPipeline"], set(CUSTOM_CODE))
    assert uploads == [("me/fd", "Upload FaithDiffSDXLPipeline", False, *layout)]
    assert (tmp_path / "out" / "README.md").read_text() == "card"
