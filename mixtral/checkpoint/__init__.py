"""Reading and writing weights.

reader.py     the one reader of stored tensors: (key, StoredTensor) per weight file, sliceable and
              memory-mapped, one dtype table; a format (safetensors, .pth; GGUF next) is one function
layouts.py    the Hugging Face and Mistral layouts and every mapping of their keys to our parameters
load.py       strict streaming loading of plain checkpoints, whole, one process's shard, or quantized while read
writer.py     the Hugging Face layout, written beside its destination and renamed into place; what may be
              replaced there (a previous output of ours) and what not without overwrite=True
quantized.py  quantized checkpoints (our state dict + quantization.json), on the same reader and writer
gguf.py       llama.cpp's GGUF files: their block types onto our weights (load_gguf), and save_gguf
hub.py        Hugging Face model ids (org/name[@revision]): from the local HF cache, or downloaded
"""

from .gguf import load_gguf, save_gguf
from .hub import resolve_checkpoint
from .layouts import (
    HF_INDEX,
    HF_SINGLE,
    Checkpoint,
    Target,
    expert_pieces,
    find_checkpoint,
    half_to_interleaved,
    interleaved_to_half,
    is_expert_param,
)
from .load import check_complete, load_model, load_weights, own_tokenizer, stored_dtype, targets_of_stored
from .quantized import QUANT_FILE, is_quantized_checkpoint, load_quantized, save_quantized
from .reader import CheckpointError, StoredTensor, stored_tensors
from .writer import OutputExistsError, check_output, save_model

__all__ = [
    "HF_INDEX",
    "HF_SINGLE",
    "QUANT_FILE",
    "Checkpoint",
    "CheckpointError",
    "OutputExistsError",
    "StoredTensor",
    "Target",
    "check_complete",
    "check_output",
    "expert_pieces",
    "find_checkpoint",
    "half_to_interleaved",
    "interleaved_to_half",
    "is_expert_param",
    "is_quantized_checkpoint",
    "load_gguf",
    "load_model",
    "load_quantized",
    "load_weights",
    "own_tokenizer",
    "resolve_checkpoint",
    "save_gguf",
    "save_model",
    "save_quantized",
    "stored_dtype",
    "stored_tensors",
    "targets_of_stored",
]
