"""LoRA: low-rank adapters on attention projections and expert weights, as parametrizations.

A target weight W becomes W + (alpha / rank) * B @ A with B initialised to zero, so training starts from the
base model exactly. Stacked expert weights [E, out, in] get one adapter per expert (A [E, rank, in],
B [E, out, rank]). The model code is untouched: `torch.nn.utils.parametrize` computes the adapted weight
whenever the layer reads it. Merging folds the adapters into the weights for good.

Adapters are saved in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, keys as PEFT names them
on transformers' `MixtralForCausalLM`), so `PeftModel.from_pretrained` loads them, and PEFT's adapters load here:

- attention: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] / `lora_B.weight` [out, r];
- experts: transformers 5 stores them stacked (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj`
  [E, D, F]) and PEFT adapts such parameters through `target_parameters`, one LoRA of rank r per expert held in
  one pair of matrices: lora_A [E*r, in] (expert e's rows e*r .. e*r+r-1) and lora_B [out, r*E] (expert e's
  columns e, E+e, 2E+e, ...). When both parameters of the experts module are adapted PEFT nests its wrappers:
  down_proj's keys are `mlp.experts.lora_A.weight`, gate_up_proj's `mlp.experts.base_layer.lora_A.weight`.
  gate_up is w1 and w3 stacked: a PEFT gate_up adapter is w1's and w3's with one shared A; ours (separate A's)
  is written as one of rank 2r (A stacked, B block-diagonal), or r where both A's are equal;
- transformers 4's per-expert modules (`block_sparse_moe.experts.{e}.w1`) are read too.

Adapters written before (`adapter.safetensors` + an `adapter_config.json` of {"rank", "alpha", "targets"}) still
load.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from ..checkpoint.writer import apply_umask
from ..model import Transformer

ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
EXPERT_TARGETS = ("w1", "w2", "w3")
ADAPTER_CONFIG = "adapter_config.json"
PEFT_FILE = "adapter_model.safetensors"
ADAPTER_FILE = "adapter.safetensors"  # the format before PEFT's: read, no longer written
PEFT_PREFIX = "base_model.model."
PEFT_ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_PEFT_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight")
_PEFT_OLD_EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])")


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


def adapters(model: nn.Module) -> list[tuple[str, nn.Module, str, LoRADelta]]:
    """(name, module, attribute, delta) for every adapted weight: `layers.0.attn.wq` (a projection's weight),
    `layers.0.moe.w1` (a stacked expert weight)."""
    found = []
    for mname, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            for delta in plist:
                if isinstance(delta, LoRADelta):
                    found.append((mname if attr == "weight" else f"{mname}.{attr}", module, attr, delta))
    return found


def adapter_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our own names: `{name}.lora_A`, `{name}.lora_B` for each adapted weight (see `adapters`)."""
    out = {}
    for name, _, _, delta in adapters(model):
        out[f"{name}.lora_A"] = delta.A.detach()
        out[f"{name}.lora_B"] = delta.B.detach()
    return out


# ---- PEFT's format ------------------------------------------------------------------------------------------


def peft_adapter(model: Transformer) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's adapters as PEFT saves them for transformers' MixtralForCausalLM: (tensors, adapter_config)."""
    by_layer: dict[int, dict[str, LoRADelta]] = {}
    for name, _, _, delta in adapters(model):
        _, i, _, target = name.split(".")
        by_layer.setdefault(int(i), {})[target] = delta
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, set[tuple[int, float]]] = {}  # PEFT's module name -> {(rank, scale)} over the layers

    def put(i: int, module: str, kind: str, A: torch.Tensor, B: torch.Tensor, rank: int, scale: float) -> None:
        tensors[f"{PEFT_PREFIX}model.layers.{i}.{module}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}model.layers.{i}.{module}.lora_B.weight"] = B.contiguous()
        kinds.setdefault(kind, set()).add((rank, scale))

    for i, ds in sorted(by_layer.items()):
        for t in ATTENTION_TARGETS:
            if t in ds:
                d = ds[t]
                put(
                    i,
                    f"self_attn.{PEFT_ATTENTION[t]}",
                    PEFT_ATTENTION[t],
                    d.A.detach(),
                    d.B.detach(),
                    d.A.shape[0],
                    d.scale,
                )
        nested = "w2" in ds  # PEFT wraps gate_up_proj first, then down_proj around it: gate_up's keys are inner
        if "w1" in ds or "w3" in ds:
            A, B, scale = _gate_up(ds.get("w1"), ds.get("w3"), model.config.hidden_dim)
            module = "mlp.experts.base_layer" if nested else "mlp.experts"
            put(i, module, "gate_up_proj", *_flatten_experts(A, B), A.shape[1], scale)
        if nested:
            d = ds["w2"]
            put(i, "mlp.experts", "down_proj", *_flatten_experts(d.A.detach(), d.B.detach()), d.A.shape[1], d.scale)
    for kind, values in kinds.items():
        if len(values) > 1:
            raise ValueError(f"the {kind} adapters differ in rank or scale between layers {sorted(values)}: PEFT's "
                             "format keeps one rank and alpha per module name")  # fmt: skip
    ranks = {kind: next(iter(v)) for kind, v in kinds.items()}
    # The most common (rank, scale) is the config's; the others go in rank_pattern / alpha_pattern.
    counts: dict[tuple[int, float], int] = {}
    for v in ranks.values():
        counts[v] = counts.get(v, 0) + 1
    r, scale = max(counts, key=lambda v: counts[v])
    others = {kind: v for kind, v in ranks.items() if v != (r, scale)}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": scale * r,
        "rank_pattern": {kind: rk for kind, (rk, _) in others.items()},
        "alpha_pattern": {kind: s * rk for kind, (rk, s) in others.items()},
        "target_modules": sorted(k for k in ranks if k.endswith("_proj") and k not in ("gate_up_proj", "down_proj")),
        "target_parameters": sorted(f"mlp.experts.{k}" for k in ranks if k in ("gate_up_proj", "down_proj")) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return tensors, config


def _gate_up(d1: LoRADelta | None, d3: LoRADelta | None, F: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """w1's and w3's adapters as one on their stack [w1; w3] (gate_up_proj): (A [E, r, D], B [E, 2F, r], scale)."""
    ref = d1 if d1 is not None else d3
    assert ref is not None
    scale = ref.scale
    if d1 is not None and d3 is not None:
        B1, B3 = d1.B.detach() * (d1.scale / scale), d3.B.detach() * (d3.scale / scale)
        if torch.equal(d1.A, d3.A):  # one A, as PEFT's own gate_up adapters have
            return d1.A.detach(), torch.cat([B1, B3], dim=1), scale
        E, r1, r3 = B1.shape[0], B1.shape[-1], B3.shape[-1]
        B = B1.new_zeros(E, 2 * F, r1 + r3)  # block-diagonal: [B1 0; 0 B3] @ [A1; A3] = [B1 A1; B3 A3]
        B[:, :F, :r1], B[:, F:, r1:] = B1, B3
        return torch.cat([d1.A.detach(), d3.A.detach()], dim=1), B, scale
    B = ref.B.detach()
    zeros = torch.zeros_like(B)
    return ref.A.detach(), torch.cat([B, zeros] if d1 is not None else [zeros, B], dim=1), scale


def _flatten_experts(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert A [E, r, in], B [E, out, r] as PEFT's lora_A [E*r, in], lora_B [out, r*E]."""
    E, r, n_in = A.shape
    return A.reshape(E * r, n_in), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def _unflatten_experts(A: torch.Tensor, B: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `_flatten_experts`."""
    if A.shape[0] % E or B.shape[1] != A.shape[0]:
        raise ValueError(f"lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not hold {E} experts' adapters")
    r = A.shape[0] // E
    return A.reshape(E, r, A.shape[1]), B.reshape(B.shape[0], r, E).permute(2, 0, 1)


def _pattern(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching the end of the module's key."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def read_peft(model: Transformer, cfg: dict, tensors: dict[str, torch.Tensor], where: Path) -> dict:
    """PEFT's tensors as {our name: (A, B, scale)} for `model`; a ValueError for what we cannot represent."""
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{where}: a {cfg.get('peft_type')} adapter; only LoRA adapters are supported")
    for flag in ("use_dora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise ValueError(f"{where}: {flag}=true is not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise ValueError(f"{where}: adapters with biases are not supported")
    if cfg.get("modules_to_save") or cfg.get("trainable_token_indices"):
        raise ValueError(f"{where}: modules_to_save / trainable tokens (whole trained modules) are not supported")
    mc = model.config
    F, D, E = mc.hidden_dim, mc.dim, mc.n_experts
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.fullmatch(key.removeprefix(PEFT_PREFIX))
        if m is None:
            raise ValueError(f"{where}: tensor {key!r} is not a LoRA weight of a Mixtral layer we can adapt")
        pairs.setdefault(f"model.layers.{m[1]}.{m[2]}", {})[m[3]] = t.float()
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    old_experts: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: {module} has lora_{next(iter(ab))} without its pair")
        A, B = ab["A"], ab["B"]
        i = int(module.split(".")[2])
        if i >= mc.n_layers:
            raise ValueError(f"{where}: {module} is beyond the model's {mc.n_layers} layers")
        rest = module.split(".", 3)[3]
        is_expert_stack = rest.startswith("mlp.experts") and set(rest.split(".")[2:]) <= {"base_layer"}
        if is_expert_stack:
            # which parameter: told by shapes (gate_up [E*r, D] / [2F, r*E], down [E*r, F] / [D, r*E])
            param = "gate_up_proj" if (A.shape[1], B.shape[0]) == (D, 2 * F) else "down_proj"
            if param == "down_proj" and (A.shape[1], B.shape[0]) != (F, D):
                raise ValueError(f"{where}: {module} has shapes {tuple(A.shape)} / {tuple(B.shape)}, "
                                 "which fit neither gate_up_proj nor down_proj of this model")  # fmt: skip
            key = f"model.layers.{i}.mlp.experts.{param}"
        else:
            key = module
        r = A.shape[0] // E if is_expert_stack else A.shape[0]
        rank = _pattern(cfg.get("rank_pattern"), key, cfg.get("r", 8))
        alpha = _pattern(cfg.get("alpha_pattern"), key, cfg.get("lora_alpha", 8))
        if rank != r:
            raise ValueError(f"{where}: {module} has rank {r}, but adapter_config.json says {rank}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        attn = {f"self_attn.{v}": k for k, v in PEFT_ATTENTION.items()}
        if rest in attn:
            out[f"layers.{i}.attn.{attn[rest]}"] = (A, B, scale)
        elif is_expert_stack:
            A3, B3 = _unflatten_experts(A, B, E)
            if param == "down_proj":
                out[f"layers.{i}.moe.w2"] = (A3, B3, scale)
            else:
                out[f"layers.{i}.moe.w1"] = (A3, B3[:, :F], scale)
                out[f"layers.{i}.moe.w3"] = (A3, B3[:, F:], scale)
        elif m2 := _PEFT_OLD_EXPERT.fullmatch(rest):
            old_experts[(f"layers.{i}.moe.{m2[2]}", int(m2[1]))] = (A, B, scale)
        else:
            raise ValueError(f"{where}: an adapter on {module}; only attention projections and experts are supported")
    for name in sorted({n for n, _ in old_experts}):  # per-expert adapters stacked (zeros where one has none)
        parts = {e: v for (n, e), v in old_experts.items() if n == name}
        if max(parts) >= E or len({(v[0].shape, v[1].shape, v[2]) for v in parts.values()}) > 1:
            raise ValueError(f"{where}: the adapters of {name}'s experts differ in shape or scale, or exceed {E}")
        A0, B0, scale = next(iter(parts.values()))
        A, B = A0.new_zeros(E, *A0.shape), B0.new_zeros(E, *B0.shape)
        for e, (a, b, _) in parts.items():
            A[e], B[e] = a, b
        out[name] = (A, B, scale)
    return out


# ---- saving and loading -------------------------------------------------------------------------------------


def save_adapter(model: Transformer, path: str | os.PathLike) -> None:
    """Write the adapters alone, in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`),
    atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, config = peft_adapter(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, tmp / PEFT_FILE, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        apply_umask(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def adapter_format(path: str | os.PathLike) -> tuple[str, dict]:
    """("peft" or "ours", the adapter config) of the adapter folder `path` (its files only looked at); a
    ValueError naming what was expected where it is neither."""
    path = Path(path).expanduser()
    expected = f"{ADAPTER_CONFIG} + {PEFT_FILE} (PEFT's format) or {ADAPTER_CONFIG} + {ADAPTER_FILE}"
    if not (path / ADAPTER_CONFIG).is_file():
        what = "does not exist" if not path.exists() else f"holds no {ADAPTER_CONFIG}"
        raise ValueError(f"{path} is not a LoRA adapter: it {what}; expected a folder with {expected}")
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not a LoRA adapter: {ADAPTER_CONFIG} is unreadable ({e}); expected {expected}"
        ) from None
    if "peft_type" in cfg:
        if not (path / PEFT_FILE).is_file():
            bin_file = (path / "adapter_model.bin").is_file()
            other = " (it holds adapter_model.bin: save it with safe_serialization=True)" if bin_file else ""
            raise ValueError(f"{path}: {ADAPTER_CONFIG} is PEFT's but {PEFT_FILE} is missing{other}")
        return "peft", cfg
    if {"rank", "alpha", "targets"} <= set(cfg) and (path / ADAPTER_FILE).is_file():
        return "ours", cfg
    raise ValueError(f"{path} is not a LoRA adapter: its {ADAPTER_CONFIG} is neither PEFT's (no peft_type) nor ours; "
                     f"expected {expected}")  # fmt: skip


def load_adapter(model: Transformer, path: str | os.PathLike) -> None:
    """Add the adapters saved at `path` to `model` (strict: every adapter tensor must fit): PEFT's format, or ours
    from before it."""
    path = Path(path).expanduser()
    kind, cfg = adapter_format(path)
    if kind == "peft":
        install(model, read_peft(model, cfg, _read(path / PEFT_FILE), path / PEFT_FILE))
        return
    tensors = _read(path / ADAPTER_FILE)
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


def read_adapter(model: Transformer, path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The adapter saved at `path` (PEFT's format or ours from before it) as {name: (A, B, scale)} for `model`
    (names as `adapters` gives them), float32, without adding it to the model; a ValueError naming what does not
    fit. Shapes are checked against the model's config, so a quantized model's adapters read too."""
    path = Path(path).expanduser()
    kind, cfg = adapter_format(path)
    if kind == "peft":
        deltas = read_peft(model, cfg, _read(path / PEFT_FILE), path / PEFT_FILE)
    else:
        tensors = _read(path / ADAPTER_FILE)
        names = [name for name, _, _ in _targets(model, tuple(cfg["targets"]))]
        expected = {f"{n}.lora_{x}" for n in names for x in "AB"}
        if expected != tensors.keys():
            missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
            raise ValueError(
                f"{path / ADAPTER_FILE} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        scale = cfg["alpha"] / cfg["rank"]
        deltas = {n: (tensors[f"{n}.lora_A"].float(), tensors[f"{n}.lora_B"].float(), scale) for n in names}
    for name, (A, B, _) in deltas.items():
        _check_shapes(model, name, A, B)
    return deltas


def weight_shape(model: Transformer, name: str) -> tuple[int, ...]:
    """The shape of the weight an adapter `name` adapts ([out, in]; experts [E, out, in]), from the model's config
    (a quantized weight stores other shapes)."""
    c = model.config
    H, G, d, D, F, E = c.n_heads, c.n_kv_heads, c.head_dim, c.dim, c.hidden_dim, c.n_experts
    shapes = {"wq": (H * d, D), "wk": (G * d, D), "wv": (G * d, D), "wo": (D, H * d),
              "w1": (E, F, D), "w3": (E, F, D), "w2": (E, D, F)}  # fmt: skip
    return shapes[name.rsplit(".", 1)[1]]


def _check_shapes(model: Transformer, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    shape = weight_shape(model, name)
    want_A, want_B = (*shape[:-2], A.shape[-2], shape[-1]), (*shape[:-1], A.shape[-2])
    if tuple(A.shape) != want_A or tuple(B.shape) != want_B:
        raise ValueError(f"the adapter of {name} is A {tuple(A.shape)}, B {tuple(B.shape)}; this model's weight "
                         f"{shape} needs A {want_A}, B {want_B}")  # fmt: skip


def _read(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from None


def install(model: Transformer, deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """Freeze `model` and add the adapters {name: (A, B, scale)} (names as `adapters` gives them)."""
    if adapters(model):
        raise ValueError("the model already has adapters: merge them (merge_lora) before adding others")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (A, B, scale) in deltas.items():
        module_name, _, attr = name.rpartition(".")
        module, attr = (
            (model.get_submodule(name), "weight") if ".attn." in name else (model.get_submodule(module_name), attr)
        )
        weight = getattr(module, attr)
        want_A, want_B = (*weight.shape[:-2], A.shape[-2], weight.shape[-1]), (*weight.shape[:-1], A.shape[-2])
        if tuple(A.shape) != want_A or tuple(B.shape) != want_B:
            raise ValueError(f"the adapter of {name} is A {tuple(A.shape)}, B {tuple(B.shape)}; this model's weight "
                             f"{tuple(weight.shape)} needs A {want_A}, B {want_B}")  # fmt: skip
        delta = LoRADelta(weight, A.shape[-2], scale * A.shape[-2])
        with torch.no_grad():
            delta.A.copy_(A)
            delta.B.copy_(B)
        parametrize.register_parametrization(module, attr, delta)
    model.lora = {"targets": sorted({n.rsplit(".", 1)[1] for n in deltas})}
    model.version += 1


def merge_lora(model: Transformer) -> Transformer:
    """Fold the adapters into the weights (W <- W + scale * B @ A) and drop them."""
    for _, module, attr, _ in adapters(model):
        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    if hasattr(model, "lora"):
        del model.lora
    for p in model.parameters():
        p.requires_grad_(True)
    model.version += 1
    return model
