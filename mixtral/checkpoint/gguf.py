"""llama.cpp's GGUF files: a model loaded from one `.gguf` file. Its tensors are read through the one reader
(`reader.py`, on the `gguf` package: memory-mapped), their keys mapped in `layouts.py`, the config read from the
file's metadata (`ModelConfig.from_gguf`) and the tokenizer too (`tokenizer.load_tokenizer`), so that a GGUF
file needs nothing beside it.

What each tensor type becomes. The weights `quantize_model` quantizes (attention projections, experts, LM head)
keep a quantized form; the others (embedding, norms, router) are dequantized to the model's dtype.
- F32, F16, BF16: plain weights in the model's dtype.
- Q4_0 (per 32 weights an fp16 scale d and 4-bit q, w = d * (q - 8)): our int4 with group size 32, the same q,
  scale d and zero 0: nothing is re-quantized. The scales are held in the model's dtype: exact in float32 and
  float16, rounded to 8 significant bits in bfloat16 (relative error <= 2^-9 per group; said when loading).
- Q4_1 (w = d * q + m per 32) and Q4_K (per 32, w = d * sc * q - dmin * mn): our int4 group 32 as well, the same
  q, scale d (d * sc), zero m + 8 d: not re-quantized; in float32 equal to the gguf package's dequantization up to
  float32 rounding of the zero, in bfloat16 / float16 the scales and zeros rounded (said when loading).
- Q8_0 (an fp16 scale per 32 int8 weights): our int8 has one scale per output row, so it is dequantized and
  re-quantized to int8 (said when loading).
- Every other block type the `gguf` package can dequantize (Q5_0, Q5_1, Q5_K, Q6_K, Q2_K, Q3_K, IQ*):
  dequantized by it and re-quantized to the nearest of ours (said when loading): types of fewer than 5.5 bits per
  weight to int4 group 32, wider ones to int8. int4 needs output rows in multiples of 64: a weight with other row
  counts becomes int8 (re-quantized, whatever its type).

The default dtype is the embedding's stored dtype where it is plain (an F32 / F16 / BF16 file loads as it is),
else bfloat16, the dtype of our int8/int4 CPU kernels.

`save_gguf` writes a model the other way (bf16, f16, f32, q8_0 or q4_0, quantized by the gguf package), as
llama.cpp's converter would from the same weights.

Loading is strict, as for the other layouts: every parameter filled exactly once, every tensor placed. Tensors
are converted one matrix (one expert) at a time, so the memory of loading is the result's plus one matrix.
"""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import gguf
import numpy as np
import torch
from sentencepiece import sentencepiece_model_pb2
from tqdm import tqdm

from ..config import ModelConfig
from ..kernels.weights import INT4_BLOCK, block_major, int4_blocks, pack_int4, quantize_int4, quantize_int8
from ..model import Transformer
from ..quantize import is_quantizable, place_quantized
from ..tokenizer import Tokenizer
from .layouts import (
    Checkpoint,
    Target,
    claim,
    expert_pieces,
    gguf_tensors,
    interleaved_to_half,
    is_expert_param,
    target_of,
)
from .reader import CheckpointError, StoredTensor, release_gguf, stored_tensors

GROUP = 32  # the block of Q4_0 and every other GGUF type's scale: our int4 group size for GGUF weights
PROGRESS_MIN_BYTES = 512 << 20
# The block types whose groups of 32 are an int4 scale and offset: mapped onto our int4 without re-quantizing.
INT4_EXACT = ("Q4_0", "Q4_1", "Q4_K")
# Below this many bits per weight a block type is re-quantized to int4, at or above to int8.
INT4_MAX_BITS = 5.5


def load_gguf(
    ckpt: Checkpoint,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> Transformer:
    """Load the model in the GGUF file `ckpt` (from `find_checkpoint`); see the module's docstring for what each
    tensor type becomes. A model with quantized weights runs on the CPU kernels."""
    try:
        return _load(ckpt, dtype, device, progress)
    finally:
        release_gguf()


def _load(
    ckpt: Checkpoint, dtype: torch.dtype | None, device: torch.device | str | None, progress: bool | None
) -> Transformer:
    file = ckpt.files[0]
    dtype = dtype or default_dtype(stored_tensors(file))
    model = Transformer.skeleton(ckpt.config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    filled: dict[str, set[int]] = {name: set() for name in expected}
    kinds: dict[str, str] = {}  # parameter -> "plain", "int8" or "int4"
    dests: dict[str, dict[str, torch.Tensor]] = {}  # parameter -> its tensors ("" for a plain one)
    notes: Counter[str] = Counter()
    show = progress if progress is not None else ckpt.size_bytes >= PROGRESS_MIN_BYTES
    with tqdm(total=ckpt.size_bytes, unit="B", unit_scale=True, desc=f"loading {file.name}", disable=not show) as bar:
        for key, stored in stored_tensors(file):  # one at a time: each one's pages are dropped once it is read
            targets = target_of(key, "gguf", ckpt.config)
            if targets is None or any(t.param not in expected for t in targets):
                raise CheckpointError(
                    f"{file}: unexpected tensor {key!r} (not part of a {ckpt.config.n_layers}-layer "
                    f"{'tied' if ckpt.config.tie_embeddings else 'untied'} Mixtral as llama.cpp writes it)"
                )
            for t in targets:
                _check(t, stored, expected[t.param], filled, ckpt)
                kind = _kind(t.param, stored)
                if kinds.setdefault(t.param, kind) != kind:
                    raise CheckpointError(
                        f"{file}: tensor {key!r} is {stored.dtype} ({kind}), but other tensors of {t.param} are "
                        f"{kinds[t.param]}: one parameter in two formats is not supported"
                    )
                _fill(t, stored, kind, expected[t.param], dests, dtype)
                notes[_note(stored.dtype, kind, dtype)] += 1
            bar.update(stored.nbytes)
    for name, shape in expected.items():
        missing = expert_pieces(name, shape) - filled[name]
        if missing:
            what = f" (experts {sorted(missing)})" if is_expert_param(name) else ""
            raise CheckpointError(f"{file}: missing weights for {name}{what}; the file holds no tensor for it")

    state: dict[str, torch.Tensor] = {}
    for name, parts in dests.items():
        if kinds[name] == "plain":
            state[name] = parts[""]
        else:
            place_quantized(model, name, kinds[name], parts, dtype, GROUP if kinds[name] == "int4" else 0)
    state |= {k: v for k, v in model.state_dict().items() if not v.is_meta}
    if device is not None and torch.device(device).type != "cpu":
        state = {k: v.to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    quantized = {k for k in kinds.values() if k != "plain"}
    if quantized:
        mode = kinds.get("layers.0.moe.w1", "int8") if len(quantized) > 1 else quantized.pop()
        model.quantization = {"mode": mode, "group_size": GROUP if mode == "int4" else None}
    said = "; ".join(f"{what} ({n} tensors)" for what, n in notes.items() if what)
    if said:
        print(f"mixtral: {file.name}: {said}", file=sys.stderr)
    return model.eval()


def default_dtype(tensors: Iterable[tuple[str, StoredTensor]]) -> torch.dtype:
    """The embedding's stored dtype where it is plain, else bfloat16 (see the module's docstring)."""
    for key, stored in tensors:
        if key == "token_embd.weight" and isinstance(stored.dtype, torch.dtype):
            return stored.dtype
    return torch.bfloat16


def _check(
    t: Target, stored: StoredTensor, full_shape: torch.Size, filled: dict[str, set[int]], ckpt: Checkpoint
) -> None:
    """The stored tensor's type and shape fit its target, which it fills for the first time."""
    file, key = stored.file, stored.key
    if isinstance(stored.dtype, torch.dtype):
        if not stored.dtype.is_floating_point:
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {stored.dtype}, expected floating point")
    elif stored.dtype not in gguf.GGMLQuantizationType.__members__:
        raise CheckpointError(f"{file}: tensor {key!r} has type {stored.dtype}, which the gguf package cannot read")
    want = tuple(full_shape[1:]) if t.expert is not None else tuple(full_shape)
    if tuple(stored.shape) != want:
        raise CheckpointError(
            f"{file}: tensor {key!r} has shape {tuple(stored.shape)}, but the file's metadata implies {want} "
            f"for {t.param}; the metadata does not match the weights"
        )
    claim(t, file, key, full_shape, filled, "metadata")


def _bits(type_name: str) -> float:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return 8 * size / block


def _kind(param: str, stored: StoredTensor) -> str:
    """What a stored tensor becomes: "plain" (in the model's dtype), "int8" or "int4"."""
    if isinstance(stored.dtype, torch.dtype) or not is_quantizable(param):
        return "plain"
    N, K = stored.shape[-2:]
    int4_fits = N % INT4_BLOCK == 0 and K % GROUP == 0
    return "int4" if int4_fits and _bits(stored.dtype) < INT4_MAX_BITS else "int8"


def _note(stored: torch.dtype | str, kind: str, dtype: torch.dtype) -> str:
    """What a user should hear about a conversion ("" for none): anything re-quantized, dequantized or rounded."""
    if isinstance(stored, torch.dtype):
        return ""
    if kind == "plain":
        return f"{stored} dequantized to {str(dtype).removeprefix('torch.')}"
    if stored in INT4_EXACT and kind == "int4":
        same = f"{stored} as int4 group 32 with the same 4-bit values"
        if stored == "Q4_0" and dtype == torch.bfloat16:
            return f"{same}, its fp16 scales rounded to bfloat16"
        if stored != "Q4_0" and dtype != torch.float32:  # zero = m + 8 d needs more bits than fp16 d and m
            return f"{same}, its scales and offsets rounded to {str(dtype).removeprefix('torch.')}"
        return ""
    why = " (our int8 has one scale per output row, Q8_0 one per 32 weights)" if stored == "Q8_0" else ""
    group = " group 32" if kind == "int4" else ""
    return f"{stored} dequantized and re-quantized to {kind}{group}{why}"


def _fill(t: Target, stored: StoredTensor, kind: str, full_shape: torch.Size, dests: dict, dtype: torch.dtype) -> None:
    """Convert a stored tensor matrix by matrix (expert by expert) into its parameter's tensors in `dests`."""
    if t.expert is not None:
        pieces = [((t.expert,), ())]
    elif is_expert_param(t.param):
        pieces = [((e,), (slice(e, e + 1),)) for e in range(full_shape[0])]
    else:
        pieces = [((), ())]
    lead = tuple(full_shape[:1]) if is_expert_param(t.param) else ()
    for dest_index, read_index in pieces:
        src = stored.read(read_index)
        if read_index:
            src = src[0]
        if t.rope_heads is not None:  # llama.cpp's converter put q/k rows in the interleaved RoPE order
            src = interleaved_to_half(src, t.rope_heads)
        parts = convert(src, stored.dtype, kind, dtype)
        into = dests.setdefault(t.param, {})
        for name, part in parts.items():
            if name not in into:  # a plain weight in the model's dtype, quantized tensors in their own
                into[name] = torch.empty((*lead, *part.shape), dtype=dtype if kind == "plain" else part.dtype)
            into[name][dest_index].copy_(part)


def convert(src: torch.Tensor, stored: torch.dtype | str, kind: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One matrix as stored (plain, or raw blocks [N, bytes per row] of a block type) -> our tensors of `kind`:
    {"": plain} cast to `dtype` when copied, {"q", "scale"} for int8, {"blocks"} for int4 (scales in `dtype`)."""
    if kind == "int4" and stored in INT4_EXACT:
        return {"blocks": int4_of_blocks(src, stored, dtype)}
    w = src if isinstance(stored, torch.dtype) else dequantize(src, stored)
    if kind == "plain":
        return {"": w}
    if kind == "int8":
        q, scale = quantize_int8(w.float(), dtype)
        return {"q": q, "scale": scale}
    q, scale, zero = quantize_int4(w.float(), GROUP, dtype)
    return {"blocks": int4_blocks(pack_int4(q), block_major(torch.stack((scale, zero), dim=-1)), GROUP)}


def dequantize(raw: torch.Tensor, type_name: str) -> torch.Tensor:
    """Raw blocks [..., N, bytes per row] of a GGUF block type -> float32 [..., N, K], by the gguf package."""
    qtype = gguf.GGMLQuantizationType[type_name]
    try:
        w = gguf.quants.dequantize(raw.numpy(), qtype)
    except NotImplementedError as e:
        raise CheckpointError(f"GGUF type {type_name} cannot be read: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(w))


def int4_of_blocks(raw: torch.Tensor, type_name: str, dtype: torch.dtype) -> torch.Tensor:
    """Q4_0 / Q4_1 / Q4_K blocks [N, bytes per row] -> our int4 `blocks` with group size 32 and the same 4-bit
    values: each type's groups of 32 are w = d * q + m with q in 0..15, ours w = (q - 8) * scale + zero, so
    scale = d and zero = m + 8 d (held in `dtype`)."""
    q, d, m = _int4_groups(raw, type_name)
    scale, zero = d, m + 8 * d
    sz = block_major(torch.stack((scale.to(dtype), zero.to(dtype)), dim=-1))
    return int4_blocks(pack_int4(q.reshape(q.shape[0], -1)), sz, GROUP)  # q stays uint8: 4x less to move


def _int4_groups(raw: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [N, G, 32] in 0..15, d float32 [N, G], m float32 [N, G]) with w = d * q + m per group of 32:
    - Q4_0: blocks of 32, an fp16 d then 16 bytes of q (low nibbles weights 0..15, high 16..31); w = d * (q - 8);
    - Q4_1: the same with an fp16 m after d; w = d * q + m;
    - Q4_K: blocks of 256, fp16 d and dmin, 12 bytes of 6-bit scales sc and mins mn (one per group, unpacked by
      the gguf package), then 128 bytes: for each 64 weights, 32 bytes whose low nibbles are the first group and
      high nibbles the second; w = d * sc * q - dmin * mn."""
    N = raw.shape[0]

    def f16(b: torch.Tensor) -> torch.Tensor:
        return b.contiguous().view(torch.float16)[..., 0].float()

    def nibbles(qs: torch.Tensor) -> torch.Tensor:  # [..., 16 bytes] -> [..., 32 values]
        return torch.cat((qs & 0xF, qs >> 4), dim=-1)

    if type_name == "Q4_0":
        b = raw.reshape(N, -1, 18)
        d = f16(b[..., 0:2])
        return nibbles(b[..., 2:]), d, -8 * d
    if type_name == "Q4_1":
        b = raw.reshape(N, -1, 20)
        return nibbles(b[..., 4:]), f16(b[..., 0:2]), f16(b[..., 2:4])
    if type_name == "Q4_K":
        b = raw.reshape(N, -1, 144)
        nb = b.shape[1]
        sc, mn = gguf.quants.Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12).numpy())
        sc = torch.from_numpy(np.ascontiguousarray(sc)).float().reshape(N, nb, 8)
        mn = torch.from_numpy(np.ascontiguousarray(mn)).float().reshape(N, nb, 8)
        qs = b[..., 16:].reshape(N, nb, 4, 1, 32)
        q = torch.cat((qs & 0xF, qs >> 4), dim=-2).reshape(N, nb * 8, 32)
        d, dmin = f16(b[..., 0:2]), f16(b[..., 2:4])
        return q, (d[..., None] * sc).reshape(N, -1), (-dmin[..., None] * mn).reshape(N, -1)
    raise ValueError(f"{type_name} is not a 4-bit type with groups of 32")


def describe_types(tensors: Iterable[tuple[str, StoredTensor]]) -> str:
    """The stored types of a GGUF file's tensors by count, e.g. "Q4_0 x 97, F32 x 65"."""
    counts: Counter[str] = Counter()
    for _, stored in tensors:
        counts[str(stored.dtype).removeprefix("torch.")] += 1
    return ", ".join(f"{name} x {n}" for name, n in counts.most_common())


# ---- writing ------------------------------------------------------------------------------------------------

Q = gguf.GGMLQuantizationType
# --type of `save_gguf` -> (the type of its matrices, llama.cpp's file type).
EXPORT_TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}


def save_gguf(model: Transformer, path: str | os.PathLike, tokenizer: Tokenizer, type_name: str = "bf16") -> None:
    """Write `model` as a GGUF file that llama.cpp reads: names, metadata and tokenizer as its converter writes
    them for Mixtral ("llama" architecture with experts, q/k rows permuted, experts merged). Every matrix in
    `type_name` (f32, f16, bf16, q8_0, q4_0: quantized by the gguf package, llama.cpp's own numbers) but the router
    and the norms, in F32 as llama.cpp's quantizer keeps them, and in q4_0 the LM head (`output.weight`) in Q8_0:
    llama.cpp's quantizer keeps that one at a higher precision too (Q6_K, which the gguf package cannot write), and
    our int4 models hold it in int8. A quantized model's weights are dequantized first. Written beside `path` and
    renamed into place."""
    if type_name not in EXPORT_TYPES:
        raise ValueError(f"unknown GGUF type {type_name!r}; choose one of {', '.join(EXPORT_TYPES)}")
    qtype, file_type = EXPORT_TYPES[type_name]
    with torch.no_grad():
        tensors = {name: t.detach().cpu() for name, t in gguf_tensors(model)}
    kinds = {
        name: Q.F32 if t.dim() == 1 or name.endswith("ffn_gate_inp.weight") else qtype for name, t in tensors.items()
    }
    if qtype == Q.Q4_0 and "output.weight" in kinds:
        kinds["output.weight"] = Q.Q8_0
    for name, t in tensors.items():
        block = gguf.GGML_QUANT_SIZES[kinds[name]][0]
        if t.shape[-1] % block:
            raise ValueError(f"{name} has rows of {t.shape[-1]}: {type_name} needs multiples of {block}")

    def produce(name: str) -> np.ndarray:
        t, kind = tensors.pop(name), kinds[name]
        if kind == Q.BF16:
            return t.to(torch.bfloat16).view(torch.uint8).numpy()
        a = t.float().numpy()
        return a.astype(np.float16) if kind == Q.F16 else a if kind == Q.F32 else gguf.quants.quantize(a, kind)

    specs = {name: (kinds[name], tuple(t.shape)) for name, t in tensors.items()}
    write_gguf(path, model.config, tokenizer, file_type, specs, produce, name=Path(path).stem)


def write_gguf(
    path: str | os.PathLike,
    config: ModelConfig,
    tokenizer: Tokenizer,
    file_type: gguf.LlamaFileType,
    specs: Mapping[str, tuple[gguf.GGMLQuantizationType, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    *,
    name: str = "mixtral",
) -> None:
    """A GGUF file for llama.cpp written tensor by tensor, as `write_safetensors` writes ours: `specs` gives each
    tensor's type and shape in elements (llama.cpp's names, our dimension order), `produce(name)` its data (any
    array whose bytes are the stored ones: raw blocks for block types), asked for once in `specs`' order, so a file
    of any size is written with one tensor in memory. The metadata and tokenizer as llama.cpp's converter writes
    them for Mixtral. Written beside `path` and renamed into place."""
    cfg = config
    if cfg.sliding_window is not None:
        raise ValueError("llama.cpp's llama architecture has no sliding window: this model cannot be written as GGUF")
    path = Path(path).expanduser()
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_expert_count(cfg.n_experts)
    w.add_expert_used_count(cfg.top_k)
    w.add_file_type(file_type)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(w, tokenizer, cfg.vocab_size)
    sizes = {}
    for key, (kind, shape) in specs.items():
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        byte_shape = (*shape[:-1], shape[-1] // block * type_size)
        sizes[key] = math.prod(byte_shape)
        w.add_tensor_info(key, byte_shape, np.dtype(np.uint8), sizes[key], raw_dtype=kind)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for key in specs:
            a = np.ascontiguousarray(produce(key)).reshape(-1).view(np.uint8)
            if a.nbytes != sizes[key]:
                raise ValueError(f"tensor {key!r} has {a.nbytes} bytes, its type and shape make {sizes[key]}")
            w.write_tensor_data(a)
            del a
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _add_vocab(w: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's converter writes a sentencepiece model (`_set_vocab_sentencepiece`): pieces,
    scores and types, padded with unused "[PAD{i}]" pieces up to the model's vocabulary."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.sentencepiece_model())
    pieces = [(p.piece, p.score, int(p.type)) for p in proto.pieces]
    if len(pieces) > vocab_size:
        raise ValueError(f"the tokenizer has {len(pieces)} pieces but the model's vocabulary is only {vocab_size}")
    pieces += [(f"[PAD{i}]", -1000.0, int(gguf.TokenType.UNUSED)) for i in range(len(pieces), vocab_size)]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([p for p, _, _ in pieces])
    w.add_token_scores([s for _, s, _ in pieces])
    w.add_token_types([t for _, _, t in pieces])
    spec = proto.trainer_spec
    w.add_bos_token_id(spec.bos_id)
    w.add_eos_token_id(spec.eos_id)
    w.add_unk_token_id(spec.unk_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
