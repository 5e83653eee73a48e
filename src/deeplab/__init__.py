"""deeplab: DeepLab v1, v2, v3 and v3+ semantic segmentation in PyTorch, faithful to the papers."""

from .deploy.fast import retain_freed_memory
from .deploy.runtimes import optimize_for_inference
from .inference.predict import (
    predict,  # the function: `deeplab.predict` names it, so import helpers `from deeplab.inference.predict`
)
from .models.checkpoint import CheckpointError, from_pretrained, load, save_checkpoint
from .models.config import ModelConfig, Preprocessing, default_atrous_rates
from .models.hub import push_to_hub
from .models.model import DeepLab, build_model
from .training.config import TrainConfig
from .training.loop import fit

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DeepLab",
    "ModelConfig",
    "Preprocessing",
    "TrainConfig",
    "build_model",
    "default_atrous_rates",
    "fit",
    "from_pretrained",
    "load",
    "optimize_for_inference",
    "predict",
    "push_to_hub",
    "retain_freed_memory",
    "save_checkpoint",
]
