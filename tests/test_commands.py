"""The `faithdiff` command and its subcommands, and the restoration settings that the restoring commands parse once:
help, aliases, prog names in messages, usage errors, start-up imports; call arguments and recorded parameters."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli there
    import tomli as tomllib

import faithdiff_pipeline
from faithdiff_pipeline import cli
from faithdiff_pipeline.commands import COMMANDS, main
from faithdiff_pipeline.application.options import as_flags
from faithdiff_pipeline.application.settings import OUTPUT_OPTIONS, RestorationSettings
from faithdiff_pipeline.command_line import RESTORATION_OPTIONS, values_of

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
HEAVY_MODULES = ("torch", "diffusers", "transformers")
# Per command, arguments its own checks refuse before any model loads.
USAGE_ERRORS = {
    "convert": ["out", "--faithdiff", "missing.bin", "--base", "missing", "--vae", "missing"],
    "upscale": ["missing.png"],
    "explain": ["missing.png", "--words", "beard"],
    "eval": ["--out", "results"],
    "prepare-data": ["-o", "set"],
    "train": ["--stage", "1", "--config", "missing.yaml"],
}


def _scripts() -> dict[str, str]:
    return tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]


def _as_subcommand(text: str, name: str) -> str:
    """``text`` with the script's name ``faithdiff-NAME`` as the subcommand's, ``faithdiff NAME`` (a longer word
    such as faithdiff-training left as it is)."""
    return re.sub(rf"faithdiff-{re.escape(name)}(?![\w-])", f"faithdiff {name}", text)


def _outcome(run, capsys) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of a command's ``main``, whether it returns its status or argparse exits."""
    try:
        status = run()
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_every_script_is_a_subcommand_and_the_script_its_alias() -> None:
    scripts = _scripts()
    assert scripts.pop("faithdiff") == "faithdiff_pipeline.commands:main"
    aliases = {name.removeprefix("faithdiff-"): target for name, target in scripts.items()}
    assert aliases == {name: f"{command.module}:main" for name, command in COMMANDS.items()}


def test_help_lists_every_subcommand_with_its_summary(capsys) -> None:
    status, out, err = _outcome(lambda: main(["--help"]), capsys)
    assert status == 0 and err == ""
    assert out.startswith("usage: faithdiff ")
    lines = out.splitlines()
    for name, command in COMMANDS.items():
        # argparse puts a long name's summary on the next line.
        at = next(i for i, line in enumerate(lines) if line.split()[:1] == [name])
        assert command.summary in " ".join(lines[at : at + 2])


@pytest.mark.parametrize("name", COMMANDS)
def test_subcommand_help_is_the_commands_help_under_its_name(name, capsys) -> None:
    module = importlib.import_module(COMMANDS[name].module)
    alias = _outcome(lambda: module.main(["--help"]), capsys)
    subcommand = _outcome(lambda: main([name, "--help"]), capsys)
    assert alias[0] == subcommand[0] == 0
    assert subcommand[1].startswith(f"usage: faithdiff {name} ")
    # "faithdiff NAME" is as long as "faithdiff-NAME": the help wraps the same.
    assert subcommand[1] == _as_subcommand(alias[1], name)


@pytest.mark.parametrize("name", COMMANDS)
def test_alias_and_subcommand_give_the_same_usage_error_under_their_own_names(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(COMMANDS[name].module)
    status, _, err = _outcome(lambda: module.main(USAGE_ERRORS[name]), capsys)
    sub_status, _, sub_err = _outcome(lambda: main([name, *USAGE_ERRORS[name]]), capsys)
    assert status == sub_status == 2
    ours = [line for line in sub_err.splitlines() if line.startswith("faithdiff")]
    assert ours and ours[-1].startswith(f"faithdiff {name}: error: ")
    assert _as_subcommand(sub_err, name) == sub_err  # the script's name appears nowhere
    assert sub_err == _as_subcommand(err, name)


def test_bad_arguments_of_a_subcommand_are_reported_by_argparse_under_its_name(capsys) -> None:
    status, _, err = _outcome(lambda: main(["upscale", "in.png", "--steps", "many"]), capsys)
    assert status == 2
    assert err.splitlines()[0].startswith("usage: faithdiff upscale ")
    assert err.splitlines()[-1] == "faithdiff upscale: error: argument --steps: invalid int value: 'many'"


@pytest.mark.parametrize(
    ("argv", "problem"),
    [([], "a command is needed"), (["upsale", "in.png"], "'upsale' is not a command"), (["--steps"], "'--steps'")],
)
def test_no_or_an_unknown_subcommand_is_one_line_and_exit_2(argv, problem, capsys) -> None:
    status, out, err = _outcome(lambda: main(argv), capsys)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"faithdiff: error: {problem}")
    assert all(name in err for name in COMMANDS)


def test_prog_names_the_dispatcher_and_its_subcommands(capsys) -> None:
    status, _, err = _outcome(lambda: main(["upscale", "missing.png"], prog="fd"), capsys)
    assert status == 2 and err == "fd upscale: error: input 'missing.png' does not exist\n"
    status, _, err = _outcome(lambda: main([], prog="fd"), capsys)
    assert status == 2 and err.startswith("fd: error: ")


def test_dispatching_imports_only_the_chosen_command_and_no_ml_framework() -> None:
    script = textwrap.dedent(
        """
        import sys

        from faithdiff_pipeline.commands import COMMANDS, main

        for argv in (["--help"], ["upscale", "--help"]):
            try:
                main(argv)
            except SystemExit as exit:
                assert exit.code == 0, exit.code
        loaded = [name for name in ("torch", "diffusers", "transformers") if name in sys.modules]
        assert not loaded, f"--help imported {loaded}"
        others = [c.module for n, c in COMMANDS.items() if n != "upscale" and c.module in sys.modules]
        assert not others, f"faithdiff upscale --help imported {others}"
        """
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: faithdiff [-h] COMMAND" in result.stdout and "usage: faithdiff upscale " in result.stdout


def test_the_module_runs_as_the_command() -> None:
    command = [sys.executable, "-m", "faithdiff_pipeline.commands", "nonsense"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("faithdiff: error: 'nonsense' is not a command")


# ------------------------------------------------------------------------------------------- restoration settings


def _settings(tmp_path, monkeypatch, *flags: str) -> RestorationSettings:
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(["in.png", *flags])
    return RestorationSettings.from_options(**values_of(args, [*RESTORATION_OPTIONS, *OUTPUT_OPTIONS]))


def test_recorded_parameters_are_those_earlier_versions_wrote(tmp_path, monkeypatch) -> None:
    """The JSON stored as a result's `parameters`, to the byte: keys, order and values, as 0.1.0 wrote them."""
    settings = _settings(
        tmp_path, monkeypatch, "--seed", "7", "--color-fix", "none", "--tile-stride", "512", "--negative-prompt", "dim"
    )
    expected = (
        '{"input": "a.png", "prompt": "An old photo.", "negative_prompt": "dim", "upscale": 2.0, "steps": 20, '
        '"guidance": 5.0, "seed": 7, "start_point": "lr", "tile_size": 1024, "tile_stride": 512, "color_fix": "none", '
        f'"model": "official release", "faithdiff_pipeline": "{faithdiff_pipeline.__version__}"}}'
    )
    assert json.dumps(settings.parameters("a.png", "An old photo.")) == expected
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    defaults = _settings(tmp_path, monkeypatch, "--model", str(model)).parameters("a.png", "")
    assert defaults["model"] == str(model) and defaults["color_fix"] == "adain" and defaults["tile_stride"] is None


def test_call_arguments_follow_the_flags(tmp_path, monkeypatch) -> None:
    settings = _settings(
        tmp_path,
        monkeypatch,
        *("--upscale", "3", "--steps", "5", "--guidance", "4.5", "--seed", "11", "--start-point", "noise"),
        *("--tile-size", "512", "--tile-stride", "256", "--tile-batch-size", "2", "--color-fix", "wavelet"),
        *("--max-pixels", "1000000", "--negative-prompt", "blur"),
    )
    arguments = settings.call_arguments("A cat.")
    generator = arguments.pop("generator")
    assert generator.initial_seed() == 11
    assert arguments == {
        "prompt": "A cat.",
        "negative_prompt": "blur",
        "upscale": 3.0,
        "num_inference_steps": 5,
        "guidance_scale": 4.5,
        "start_point": "noise",
        "tile_size": 512,
        "tile_stride": 256,
        "tile_batch_size": 2,
        "color_fix": "wavelet",
        "max_output_pixels": 1000000,
    }


def test_settings_are_parsed_as_the_pipeline_takes_them(tmp_path, monkeypatch) -> None:
    settings = _settings(tmp_path, monkeypatch, "--low-vram", "--color-fix", "none", "--format", "tiff")
    arguments = settings.call_arguments("")
    assert arguments["tile_batch_size"] == 1 and arguments["color_fix"] is None
    assert settings.low_vram and settings.output.format == "tiff" and settings.output.suffix == ".tif"
    with pytest.raises(AttributeError):
        settings.steps = 3  # frozen: parsed once, then only read


def test_settings_refuse_mistakes_by_their_flags(tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="`quality`") as refused:
        _settings(tmp_path, monkeypatch, "--quality", "0")
    assert as_flags(str(refused.value)).startswith("--quality must be")
    with pytest.raises(ValueError) as refused:
        _settings(tmp_path, monkeypatch, "--upscale", "-1")
    assert as_flags(str(refused.value)) == "--upscale must be a finite number > 0, got -1.0"
    with pytest.raises(ValueError) as refused:
        _settings(tmp_path, monkeypatch, "--tile-size", "512", "--tile-stride", "520")
    assert "--tile-stride must be a multiple of 8 between 8 and --tile-size (512)" in as_flags(str(refused.value))


def test_the_release_defaults_are_written_once() -> None:
    """The pipeline's signature, the commands' option table and the settings take the release's values from one
    module: a literal typed again anywhere would drift."""
    import inspect

    from faithdiff_pipeline import FaithDiffSDXLPipeline, release_settings
    from faithdiff_pipeline.application.options import OPTIONS

    signature = inspect.signature(FaithDiffSDXLPipeline.__call__).parameters
    pairs = {
        "upscale": ("upscale", release_settings.UPSCALE),
        "num_inference_steps": ("steps", release_settings.NUM_INFERENCE_STEPS),
        "guidance_scale": ("guidance", release_settings.GUIDANCE_SCALE),
        "start_point": ("start_point", release_settings.START_POINT),
        "tile_size": ("tile_size", release_settings.TILE_SIZE),
        "tile_batch_size": ("tile_batch_size", release_settings.TILE_BATCH_SIZE),
        "color_fix": ("color_fix", release_settings.COLOR_FIX),
        "max_output_pixels": ("max_pixels", release_settings.MAX_OUTPUT_PIXELS),
    }
    for argument, (option, value) in pairs.items():
        assert signature[argument].default == OPTIONS[option].default == value, argument
    settings = RestorationSettings()
    assert (settings.upscale, settings.steps, settings.tile_size) == (2.0, 20, 1024)
