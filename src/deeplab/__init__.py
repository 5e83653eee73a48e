"""deeplab: DeepLabv3 and DeepLabv3+ semantic segmentation in PyTorch, faithful to the papers."""

from .checkpoint import CheckpointError, load, save_checkpoint
from .config import ModelConfig, Preprocessing, default_atrous_rates
from .fast import retain_freed_memory
from .runtimes import optimize_for_inference
from .model import DeepLab, build_model
from .predict import predict  # the function: `deeplab.predict` names it, so import helpers `from deeplab.predict`
from .train import TrainConfig, fit

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
    "load",
    "optimize_for_inference",
    "predict",
    "retain_freed_memory",
    "save_checkpoint",
]
