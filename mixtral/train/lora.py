"""LoRA: low-rank adapters on attention projections and expert weights, as parametrizations.

A target weight W becomes W + (alpha / rank) * B @ A with B initialised to zero, so training starts from the
base model exactly. Stacked expert weights [E, out, in] get one adapter per expert (A [E, rank, in],
B [E, out, rank]). The model code is untouched: `torch.nn.utils.parametrize` computes the adapted weight
whenever the layer reads it. Merging folds the adapters into the weights for good.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from ..model import Transformer

ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
EXPERT_TARGETS = ("w1", "w2", "w3")
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


class LoRADelta(nn.Module):
    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        *lead, out_features, in_features = weight.shape
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(*lead, rank, in_features, dtype=torch.float32, device=weight.device))
        self.B = nn.Parameter(torch.zeros(*lead, out_features, rank, dtype=torch.float32, device=weight.device))
        nn.init.normal_(self.A, std=1.0 / math.sqrt(in_features))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scale * (self.B @ self.A)).to(weight.dtype)


def _targets(model: Transformer, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(name, module, attribute) for every adapted weight."""
    unknown = set(targets) - set(ATTENTION_TARGETS + EXPERT_TARGETS)
    if unknown or not targets:
        raise ValueError(
            f"LoRA targets {sorted(unknown) or '(none)'} are invalid; choose from {ATTENTION_TARGETS + EXPERT_TARGETS}"
        )
    found = []
    for i, layer in enumerate(model.layers):
        for t in targets:
            if t in ATTENTION_TARGETS:
                found.append((f"layers.{i}.attn.{t}", getattr(layer.attn, t), "weight"))
            else:
                found.append((f"layers.{i}.moe.{t}", layer.moe, t))
    return found


def apply_lora(model: Transformer, rank: int, alpha: float, targets: tuple[str, ...]) -> list[nn.Parameter]:
    """Freeze the model and add adapters; returns the adapter parameters (the only trainable ones)."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for _, module, attr in _targets(model, targets):
        delta = LoRADelta(getattr(module, attr), rank, alpha)
        parametrize.register_parametrization(module, attr, delta)
        params += [delta.A, delta.B]
    model.lora = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    model.version += 1
    return params


def adapter_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    out = {}
    for name, module, attr in _targets(model, tuple(model.lora["targets"])):
        delta = module.parametrizations[attr][0]
        out[f"{name}.lora_A"] = delta.A.detach()
        out[f"{name}.lora_B"] = delta.B.detach()
    return out


def save_adapter(model: Transformer, path: str | os.PathLike) -> None:
    """Write the adapters alone (safetensors + JSON config), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file({k: v.contiguous() for k, v in adapter_state_dict(model).items()}, tmp / ADAPTER_FILE)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(model.lora, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_adapter(model: Transformer, path: str | os.PathLike) -> None:
    """Add the adapters saved at `path` to `model` (strict: every adapter tensor must fit)."""
    path = Path(path)
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
        tensors = load_file(path / ADAPTER_FILE)
    except (OSError, json.JSONDecodeError, Exception) as e:
        raise ValueError(f"{path} is not a readable LoRA adapter ({ADAPTER_CONFIG} + {ADAPTER_FILE}): {e}") from None
    apply_lora(model, cfg["rank"], cfg["alpha"], tuple(cfg["targets"]))
    expected = adapter_state_dict(model)
    if expected.keys() != tensors.keys():
        missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
        raise ValueError(
            f"{path / ADAPTER_FILE} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for k, v in expected.items():
            if v.shape != tensors[k].shape:
                raise ValueError(
                    f"{path / ADAPTER_FILE}: {k} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}"
                )
            v.copy_(tensors[k])


def merge_lora(model: Transformer) -> Transformer:
    """Fold the adapters into the weights (W <- W + scale * B @ A) and drop them."""
    for _, module, attr in _targets(model, tuple(model.lora["targets"])):
        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    del model.lora
    for p in model.parameters():
        p.requires_grad_(True)
    model.version += 1
    return model
