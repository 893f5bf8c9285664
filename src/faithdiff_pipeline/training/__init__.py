"""Training FaithDiff: data preparation (``faithdiff-prepare-data``, in ``.prepare``) and the two training stages
(``faithdiff-train``, in ``.train``). The command-line modules are not imported here, so that ``python -m`` runs them
cleanly, and the public names are imported on first use, so that the commands' ``--help`` does not load torch.

See ``docs/training.md`` for the recipe. Needs the ``[train]`` extra (accelerate, pyyaml; tensorboard for logging).
"""

from typing import TYPE_CHECKING, Any

from .._imports import export_table, lazy_export

_import_structure = {
    "config": ["TrainingConfig", "TrainingSetupError"],
    "data": ["DegradingDataset", "ManifestRecord", "PreparedPairsDataset", "read_manifest", "training_example"],
    "losses": ["epsilon_loss", "noise_latents", "offset_noise"],
    "stages": ["STAGE_RECIPES", "FaithDiffTrainingModule", "load_starting_pipeline", "training_module"],
}
_exports = export_table(_import_structure)

# Spelled out for static tools; tests/test_startup.py checks it against the export table.
__all__ = [
    "DegradingDataset",
    "FaithDiffTrainingModule",
    "ManifestRecord",
    "PreparedPairsDataset",
    "STAGE_RECIPES",
    "TrainingConfig",
    "TrainingSetupError",
    "epsilon_loss",
    "load_starting_pipeline",
    "noise_latents",
    "offset_noise",
    "read_manifest",
    "training_example",
    "training_module",
]

if TYPE_CHECKING:
    from .config import TrainingConfig, TrainingSetupError
    from .data import DegradingDataset, ManifestRecord, PreparedPairsDataset, read_manifest, training_example
    from .losses import epsilon_loss, noise_latents, offset_noise
    from .stages import STAGE_RECIPES, FaithDiffTrainingModule, load_starting_pipeline, training_module


def __getattr__(name: str) -> Any:
    return lazy_export(__name__, _exports, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_exports})
