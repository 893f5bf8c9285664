"""Start-up cost and noise: `--help` of every command loads no ML framework, and importing the package prints nothing.

Each check runs in a fresh interpreter, since this one has long imported torch, diffusers and transformers.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

import faithdiff_pipeline
import faithdiff_pipeline.degradations
import faithdiff_pipeline.evaluation
import faithdiff_pipeline.training

HEAVY_MODULES = ("torch", "diffusers", "transformers")
# The modules of the console scripts in pyproject.toml.
COMMAND_MODULES = (
    "faithdiff_pipeline.commands",
    "faithdiff_pipeline.cli",
    "faithdiff_pipeline.conversion",
    "faithdiff_pipeline.explain",
    "faithdiff_pipeline.evaluation.cli",
    "faithdiff_pipeline.training.prepare",
    "faithdiff_pipeline.training.train",
)
# faithdiff-train's flags are transformers' HfArgumentParser over its settings dataclass, so its --help reads the
# transformers package itself (which imports neither torch nor diffusers).
ALLOWED_AT_HELP = {"faithdiff_pipeline.training.train": ("transformers",)}
LAZY_PACKAGES = (
    faithdiff_pipeline,
    faithdiff_pipeline.degradations,
    faithdiff_pipeline.evaluation,
    faithdiff_pipeline.training,
)


def run_python(code: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *options, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_console_script_is_checked() -> None:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    scripts = text.split("[project.scripts]")[1].split("\n[")[0]
    modules = {line.split('"')[1].split(":")[0] for line in scripts.splitlines() if line.startswith("faithdiff")}
    assert modules == set(COMMAND_MODULES)


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_help_loads_no_ml_framework(module: str) -> None:
    heavy = [name for name in HEAVY_MODULES if name not in ALLOWED_AT_HELP.get(module, ())]
    result = run_python(
        f"""
        import importlib
        import sys

        command = importlib.import_module({module!r})
        try:
            command.main(["--help"])
        except SystemExit as exit:
            assert exit.code in (0, None), f"--help exited with {{exit.code!r}}"
        else:
            raise AssertionError("--help returned instead of exiting")
        loaded = [name for name in {heavy!r} if name in sys.modules]
        assert not loaded, f"--help imported {{loaded}}"
        """
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert result.stderr == ""


def test_importing_the_packages_loads_no_ml_framework() -> None:
    result = run_python(
        f"""
        import sys

        import faithdiff_pipeline, faithdiff_pipeline.degradations, faithdiff_pipeline.evaluation
        import faithdiff_pipeline.training

        loaded = [name for name in {HEAVY_MODULES!r} if name in sys.modules]
        assert not loaded, f"importing the packages imported {{loaded}}"
        """
    )
    assert result.returncode == 0, result.stderr


# diffusers imports bitsandbytes and torchao whenever they are installed (the test extra installs them for the
# quantisation tests), and both announce themselves on import; neither is ours nor imported by us, so they are made
# to look absent here, as they are on a plain install.
HIDE_QUANTISERS = "import sys; sys.modules.update(bitsandbytes=None, torchao=None)\n"


def test_importing_the_pipeline_prints_no_warning() -> None:
    result = run_python(
        HIDE_QUANTISERS
        + textwrap.dedent(
            """
            import faithdiff_pipeline, faithdiff_pipeline.evaluation, faithdiff_pipeline.training
            from faithdiff_pipeline import FaithDiffSDXLPipeline
            """
        ),
        "-W",
        "always",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_importing_every_submodule_prints_no_warning() -> None:
    # One interpreter for all: each module's import-time warnings are printed when it is first imported, whatever
    # imported it, so importing them all once shows every one of them.
    result = run_python(
        HIDE_QUANTISERS
        + textwrap.dedent(
            """
            import importlib
            import pkgutil

            import faithdiff_pipeline

            for module in pkgutil.walk_packages(faithdiff_pipeline.__path__, "faithdiff_pipeline."):
                importlib.import_module(module.name)
            """
        ),
        "-W",
        "always",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("package", LAZY_PACKAGES, ids=lambda package: package.__name__)
def test_lazy_public_names(package: ModuleType) -> None:
    """``__all__`` is exactly what the lazy ``__getattr__`` serves, ``dir`` lists it, and each name resolves."""
    assert sorted(package.__all__) == sorted(package._exports)
    assert set(package.__all__) <= set(dir(package))
    for name in package.__all__:
        assert getattr(package, name) is getattr(sys.modules[f"{package.__name__}.{package._exports[name]}"], name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = package.not_a_name
