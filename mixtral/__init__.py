"""Mixtral: the sparse mixture-of-experts language model, end to end."""

from .builtin import BUILTIN
from .cache import KVCache
from .checkpoint import CheckpointError, load_model, save_gguf, save_model
from .config import PRESETS, ConfigError, ModelConfig, get_preset
from .generate import generate, generate_stream
from .model import Transformer
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "BUILTIN",
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
    "generate",
    "generate_stream",
    "get_preset",
    "load_model",
    "load_tokenizer",
    "save_gguf",
    "save_model",
]
