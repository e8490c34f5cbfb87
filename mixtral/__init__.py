"""Mixtral: the sparse mixture-of-experts language model, end to end."""

from .checkpoint import CheckpointError, load_model, save_model
from .config import PRESETS, ConfigError, ModelConfig, get_preset
from .model import Transformer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "Transformer",
    "get_preset",
    "load_model",
    "save_model",
]
