"""Training FaithDiff: data preparation (``faithdiff-prepare-data``, in ``.prepare``) and the two training stages
(``faithdiff-train``, in ``.train``). The command-line modules are not imported here, so that ``python -m`` runs them
cleanly.

See ``docs/training.md`` for the recipe. Needs the ``[train]`` extra (accelerate, pyyaml; tensorboard for logging).
"""

from .config import TrainingConfig, TrainingSetupError
from .data import DegradingDataset, ManifestRecord, PreparedPairsDataset, read_manifest, training_example
from .losses import epsilon_loss, noise_latents, offset_noise
from .stages import STAGE_RECIPES, FaithDiffTrainingModule, load_starting_pipeline, training_module

__all__ = [
    "STAGE_RECIPES",
    "DegradingDataset",
    "FaithDiffTrainingModule",
    "ManifestRecord",
    "PreparedPairsDataset",
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
