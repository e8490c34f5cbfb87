"""GGUF files as llama.cpp writes them (written here with its own `gguf` package: names, metadata, the q/k row
permutation of its converter, merged or per-expert experts), loaded to the same numbers as the same weights from
safetensors; Q4_0 onto our int4 exactly, Q8_0 close; the tokenizer from the file's metadata; a clear error for a
broken file."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_tokens, tiny_model

import mixtral
import mixtral.cli
from mixtral.checkpoint import CheckpointError, find_checkpoint, half_to_interleaved, interleaved_to_half
from mixtral.checkpoint.reader import open_gguf, release_gguf, stored_tensors
from mixtral.config import ModelConfig
from mixtral.kernels.weights import QuantizedWeight
from mixtral.tokenizer import load_tokenizer

Q = gguf.GGMLQuantizationType
# dim 128 and 2 KV heads of 32: every quantized matrix has rows in multiples of 64 (int4's block), and q/k are
# permuted with different head counts (GQA), as llama.cpp's converter does.
CONFIG = ModelConfig(dim=128, n_layers=2, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=32000, n_experts=4)


def gguf_tensors(model: mixtral.Transformer, *, merged: bool = True) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names, q/k rows permuted as its converter (`LlamaModel.permute`) does."""
    cfg, p = model.config, dict(model.named_parameters())
    out = {"token_embd.weight": p["embed.weight"], "output_norm.weight": p["norm.weight"]}
    if "output.weight" in p:
        out["output.weight"] = p["output.weight"]
    for i in range(cfg.n_layers):
        b, L = f"blk.{i}.", f"layers.{i}."
        out[b + "attn_norm.weight"] = p[L + "attn_norm.weight"]
        out[b + "attn_q.weight"] = half_to_interleaved(p[L + "attn.wq.weight"], cfg.n_heads)
        out[b + "attn_k.weight"] = half_to_interleaved(p[L + "attn.wk.weight"], cfg.n_kv_heads)
        out[b + "attn_v.weight"] = p[L + "attn.wv.weight"]
        out[b + "attn_output.weight"] = p[L + "attn.wo.weight"]
        out[b + "ffn_norm.weight"] = p[L + "ffn_norm.weight"]
        out[b + "ffn_gate_inp.weight"] = p[L + "moe.gate.weight"]
        for w, name in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
            if merged:
                out[f"{b}ffn_{name}_exps.weight"] = p[f"{L}moe.{w}"]
            else:
                for e in range(cfg.n_experts):
                    out[f"{b}ffn_{name}.{e}.weight"] = p[f"{L}moe.{w}"][e]
    return out


def v1_vocab() -> tuple[list[str], list[float], list[int]]:
    """Mixtral's tokenizer (mistral-common's tokenizer.model.v1) as llama.cpp's converter copies it."""
    import sentencepiece

    data = importlib.resources.files("mistral_common").joinpath("data", "tokenizer.model.v1").read_bytes()
    sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        types.append(int(kind))
    return tokens, scores, types


# Where the fp16 scales sit in a K-quant block (byte offsets of d, and of dmin where the type has one).
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_blocks(shape: tuple[int, ...], qtype: Q, seed: int = 0) -> np.ndarray:
    """Random (valid) blocks of a type the gguf package can read but not write: random bits, sane fp16 scales."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, gguf.quants.quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = out.reshape(-1, size)
    for at in K_SCALES[qtype]:
        blocks[:, at : at + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return out


def write_gguf(
    model: mixtral.Transformer,
    path: Path,
    qtype: Q = Q.F32,
    *,
    merged: bool = True,
    vocab: bool = True,
    chat_template: str | None = None,
) -> Path:
    """`model` as a GGUF file: norms and router in F32 (llama.cpp's quantizer leaves them), every other matrix in
    `qtype`; the metadata its converter writes for Mixtral."""
    cfg = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-mixtral")
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
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    if vocab:
        tokens, scores, types = v1_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for name, t in gguf_tensors(model, merged=merged).items():
        a = t.detach().float().numpy()
        kind = Q.F32 if a.ndim == 1 or name.endswith("ffn_gate_inp.weight") else qtype
        if kind == Q.F32:
            w.add_tensor(name, a)
        elif kind == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        elif kind == Q.BF16:
            w.add_tensor(name, t.detach().to(torch.bfloat16).view(torch.uint8).numpy(), raw_dtype=Q.BF16)
        else:
            try:
                blocks = gguf.quants.quantize(a, kind)
            except NotImplementedError:  # the package cannot quantize K-quants: random blocks of that type
                blocks = random_blocks(a.shape, kind)
            w.add_tensor(name, blocks, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def model():
    return tiny_model(CONFIG, seed=4, std=0.05)


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(CONFIG.vocab_size, batch=2, seq=12, seed=6)


@pytest.fixture(scope="module")
def reference(model, tokens):
    with torch.no_grad():
        return model(tokens)


def logits(m, tokens):
    with torch.no_grad():
        return m(tokens)


@pytest.mark.parametrize("merged", [True, False], ids=["merged-experts", "per-expert"])
def test_f32_gguf_equals_safetensors(model, tokens, tmp_path, merged):
    mixtral.save_model(model, tmp_path / "hf")
    from_safetensors = mixtral.load_model(tmp_path / "hf")
    from_gguf = mixtral.load_model(write_gguf(model, tmp_path / "m.gguf", merged=merged))
    assert from_gguf.config == from_safetensors.config
    assert next(from_gguf.parameters()).dtype == torch.float32  # an F32 file loads as it is
    assert torch.equal(logits(from_gguf, tokens), logits(from_safetensors, tokens))


@pytest.mark.parametrize(("qtype", "dtype"), [(Q.BF16, torch.bfloat16), (Q.F16, torch.float16)], ids=["bf16", "f16"])
def test_half_gguf_equals_half_safetensors(tokens, tmp_path, qtype, dtype):
    half = tiny_model(CONFIG, seed=4, std=0.05).to(dtype)
    mixtral.save_model(half, tmp_path / "hf")
    from_gguf = mixtral.load_model(write_gguf(half, tmp_path / "m.gguf", qtype))
    assert next(from_gguf.parameters()).dtype == dtype  # a BF16 / F16 file loads as it is
    from_safetensors = mixtral.load_model(tmp_path / "hf")
    for (name, a), (_, b) in zip(from_gguf.state_dict().items(), from_safetensors.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(logits(from_gguf, tokens), logits(from_safetensors, tokens))


def gguf_dequantized(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file as the gguf package dequantizes it, under our names (q/k permuted back)."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        out[t.name] = w.reshape(tuple(reversed(t.shape.tolist())))
    return out


@pytest.mark.parametrize("merged", [True, False], ids=["merged-experts", "per-expert"])
def test_q4_0_is_our_int4_exactly(model, tokens, tmp_path, merged):
    path = write_gguf(model, tmp_path / "q4_0.gguf", Q.Q4_0, merged=merged)
    m = mixtral.load_model(path, dtype=torch.float32)
    assert m.quantization == {"mode": "int4", "group_size": 32}
    ref = gguf_dequantized(path)
    cfg = m.config
    for i in range(cfg.n_layers):
        layer = m.layers[i]
        for ours, name in (
            (layer.attn.wv, "attn_v"),
            (layer.attn.wo, "attn_output"),
            (layer.moe.w1, "ffn_gate"),
            (layer.moe.w2, "ffn_down"),
            (layer.moe.w3, "ffn_up"),
        ):
            assert isinstance(ours, QuantizedWeight) and ours.mode == "int4" and ours.group_size == 32
            if name.startswith("ffn") and not merged:
                want = torch.stack([ref[f"blk.{i}.{name}.{e}.weight"] for e in range(cfg.n_experts)])
            else:
                want = ref[f"blk.{i}.{name}{'_exps' if name.startswith('ffn') else ''}.weight"]
            assert torch.equal(ours.dequantize(torch.float32), want), (i, name)
        # q/k: the same numbers, rows back in the rotate-half order
        q = interleaved_to_half(ref[f"blk.{i}.attn_q.weight"], cfg.n_heads)
        k = interleaved_to_half(ref[f"blk.{i}.attn_k.weight"], cfg.n_kv_heads)
        assert torch.equal(layer.attn.wq.dequantize(torch.float32), q)
        assert torch.equal(layer.attn.wk.dequantize(torch.float32), k)
    # the embedding (Q4_0 too) is dequantized; the router and norms stay F32
    assert torch.equal(m.embed.weight, ref["token_embd.weight"])
    # the LM head (Q4_0 in the file) is held as int4 here too
    assert torch.equal(m.output.dequantize(torch.float32), ref["output.weight"])


def test_q4_0_in_bfloat16_rounds_only_the_scales(model, tmp_path, capfd):
    path = write_gguf(model, tmp_path / "q4_0.gguf", Q.Q4_0)
    exact = mixtral.load_model(path, dtype=torch.float32)
    err = capfd.readouterr().err
    assert "Q4_0 dequantized to float32 (1 tensors)" in err  # the embedding
    assert "rounded" not in err and "re-quantized" not in err
    m = mixtral.load_model(path)  # bfloat16 by default for a quantized file
    assert "scales rounded to bfloat16" in capfd.readouterr().err
    assert m.embed.weight.dtype == torch.bfloat16
    a, b = m.layers[0].moe.w2.dequantize(torch.float32), exact.layers[0].moe.w2.dequantize(torch.float32)
    assert not torch.equal(a, b)
    assert ((a - b).abs() <= b.abs() * 2**-8).all()  # the scale's rounding, nothing else


def kl_top1(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """KL(a || b) per token (nats) and the fraction of tokens whose top-1 agrees."""
    la, lb = F.log_softmax(a.float(), -1), F.log_softmax(b.float(), -1)
    kl = (la.exp() * (la - lb)).sum(-1).mean().item()
    return kl, (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def test_q8_0_loads_close_and_says_it_requantizes(model, tokens, reference, tmp_path, capfd):
    m = mixtral.load_model(write_gguf(model, tmp_path / "q8_0.gguf", Q.Q8_0), dtype=torch.float32)
    assert "Q8_0 dequantized and re-quantized to int8" in capfd.readouterr().err
    assert m.layers[0].moe.w1.mode == "int8"
    kl, top1 = kl_top1(reference, logits(m, tokens))
    print(f"Q8_0 -> int8: KL {kl:.2e}, top-1 agreement {top1:.3f}")
    assert kl < 1e-3 and top1 >= 0.9


# K-quants come in blocks of 256 weights: a model whose rows are that long
CONFIG_256 = ModelConfig(dim=256, n_layers=1, hidden_dim=256, n_heads=4, n_kv_heads=2, vocab_size=32000, n_experts=4)


@pytest.mark.parametrize(
    ("qtype", "mode"), [(Q.Q4_1, "int4"), (Q.Q4_K, "int4"), (Q.Q5_0, "int8"), (Q.Q6_K, "int8")], ids=lambda v: str(v)
)
def test_other_types(tmp_path, capfd, qtype, mode):
    model = tiny_model(CONFIG_256, seed=2, std=0.05)
    path = write_gguf(model, tmp_path / "q.gguf", qtype, vocab=False)
    m = mixtral.load_model(path, dtype=torch.float32)
    err = capfd.readouterr().err
    if mode == "int8":
        assert f"{qtype.name} dequantized and re-quantized to int8" in err
    else:
        assert "re-quantized" not in err  # mapped as they are
    ref = gguf_dequantized(path)["blk.0.ffn_down_exps.weight"]
    assert torch.isfinite(ref).all()
    w = m.layers[0].moe.w2
    assert w.mode == mode
    err = (w.dequantize(torch.float32) - ref).abs()
    if mode == "int4":  # the same 4-bit values, scales and offsets: equal up to float32 rounding of the zero
        assert err.max() <= 1e-6 * ref.abs().max()
    else:  # at most half a step of the re-quantized grid (plus float rounding)
        step = ref.abs().amax(-1, keepdim=True) / 127 if mode == "int8" else ref.abs().max() * 2 / 15
        assert (err <= step / 2 * 1.001).all()
    if qtype not in K_SCALES:  # (K-quants are random blocks here, not the model's weights)
        tokens = random_tokens(CONFIG_256.vocab_size, batch=1, seq=8)
        kl, _ = kl_top1(logits(model, tokens), logits(m, tokens))
        assert kl < 0.05


def test_reading_is_memory_mapped(model, tmp_path):
    path = write_gguf(model, tmp_path / "m.gguf", Q.Q4_0, vocab=False)
    base, size = open_gguf(path).data.ctypes.data, path.stat().st_size
    for _, stored in stored_tensors(path):  # plain tensors and raw blocks alike: views of the file's mapping
        assert base <= stored.read().data_ptr() < base + size
    release_gguf()


def test_config_from_metadata(model, tmp_path):
    ckpt = find_checkpoint(write_gguf(model, tmp_path / "m.gguf", vocab=False))
    assert ckpt.layout == "gguf" and ckpt.config == CONFIG


def test_truncated_gguf(model, tmp_path):
    path = write_gguf(model, tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"m\.gguf is not a readable GGUF file"):
        mixtral.load_model(path)


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=r"bad\.gguf is not a readable GGUF file"):
        mixtral.load_model(path)
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match=r"bad\.gguf"):
        find_checkpoint(path)


def test_metadata_that_does_not_match_the_weights(model, tmp_path):
    path = write_gguf(model, tmp_path / "m.gguf", vocab=False)
    wrong = tiny_model(ModelConfig(**{**CONFIG.__dict__, "hidden_dim": 192}), seed=1)
    other = write_gguf(wrong, tmp_path / "other.gguf", vocab=False)
    reader = gguf.GGUFReader(path, "r+")  # write the other file's FFN length into this one's header
    reader.fields["llama.feed_forward_length"].parts[-1][0] = 192
    del reader
    with pytest.raises(CheckpointError, match=r"m\.gguf: tensor 'blk\.0\.ffn_gate_exps\.weight' has shape"):
        mixtral.load_model(path)
    assert mixtral.load_model(other).config.hidden_dim == 192


TEXTS = [
    "Hello, world!",
    "  two leading spaces and   runs of spaces ",
    "Numbers 1234567 and 3.14159, tabs\there, newlines\nthere.",
    "Unicode: héllo wörld, 日本語, emoji 🙂 and rare ꙮ",
    "<s>[INST] not control tokens [/INST]</s>",
    "",
]


def test_tokenizer_from_metadata_equals_mistral_common(model, tmp_path):
    path = write_gguf(model, tmp_path / "m.gguf")
    ours = load_tokenizer(path)
    reference = load_tokenizer(None)  # mistral-common's tokenizer.model.v1
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (32000, 1, 2)
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.decode(ours.encode(text)) == reference.decode(reference.encode(text))
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    turns = [("user", "Hi there"), ("assistant", "Hello!"), ("user", "Count to 3.")]
    messages = [{"role": role, "content": text} for role, text in turns]
    kinds = {"user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[role](content=text) for role, text in turns])
    assert ours.encode_chat(messages) == MistralTokenizer.v1().encode_chat_completion(request).tokens


def test_a_chat_template_other_than_mistrals_is_said(model, tmp_path, capfd):
    path = write_gguf(model, tmp_path / "m.gguf", vocab=True)
    assert load_tokenizer(path) and capfd.readouterr().err == ""  # no template: Mistral's v1, nothing to say
    path = write_gguf(model, tmp_path / "t.gguf", chat_template="{% for m in messages %}<|im_start|>{% endfor %}")
    load_tokenizer(path)
    assert "not Mistral's [INST] format" in capfd.readouterr().err
    load_tokenizer(write_gguf(model, tmp_path / "v1.gguf", chat_template="{{ bos_token }}[INST] {{ m }} [/INST]"))
    assert capfd.readouterr().err == ""


def test_gguf_without_a_tokenizer_says_so(model, tmp_path):
    with pytest.raises(ValueError, match="pass --tokenizer"):
        load_tokenizer(write_gguf(model, tmp_path / "m.gguf", vocab=False))


def test_cli_runs_a_gguf_file(model, tmp_path, capsys):
    path = write_gguf(model, tmp_path / "m.gguf", Q.Q4_0)
    assert mixtral.cli.main(["info", "--checkpoint", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "GGUF" and info["dtype"] == "Q4_0 x 16, float32 x 7"
    assert info["config"]["n_experts"] == CONFIG.n_experts
    args = ["generate", "--checkpoint", str(path), "--prompt", "Hello", "--max-new-tokens", "4", "--seed", "1"]
    assert mixtral.cli.main(args) == 0  # the tokenizer from the file, nothing beside it
    out = capsys.readouterr()
    assert "Q4_0 as int4 group 32" in out.err and "tokens/s" in out.err and out.out.strip()


# ---- writing --------------------------------------------------------------------------------------------------


def test_export_reads_back_with_llama_cpp_names(model, tokens, tmp_path, capsys):
    tok = load_tokenizer(None)
    written = tmp_path / "ours.gguf"
    mixtral.save_gguf(model, written, tok, "f32")
    expected = write_gguf(model, tmp_path / "theirs.gguf", Q.F32)  # as llama.cpp's converter names and permutes
    ours, theirs = gguf.GGUFReader(written), gguf.GGUFReader(expected)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name
    for key in ("llama.block_count", "llama.expert_count", "llama.attention.head_count_kv", "tokenizer.ggml.tokens"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert torch.equal(logits(mixtral.load_model(written), tokens), logits(model, tokens))
    assert load_tokenizer(written).encode(TEXTS[3]) == tok.encode(TEXTS[3])

    # mixtral export, from a safetensors checkpoint, in Q4_0: the gguf package's own Q4_0 of the same weights
    mixtral.save_model(model, tmp_path / "hf")
    args = ["export", "--checkpoint", str(tmp_path / "hf"), "--type", "q4_0", "--out", str(tmp_path / "q.gguf")]
    assert mixtral.cli.main(args) == 0
    assert "wrote a q4_0 GGUF file" in capsys.readouterr().err
    q4 = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    want = gguf.quants.quantize(theirs.tensors[0].data, Q.Q4_0)  # token_embd
    assert q4["token_embd.weight"].tensor_type == Q.Q4_0 and np.array_equal(q4["token_embd.weight"].data, want)
    assert q4["blk.0.ffn_gate_inp.weight"].tensor_type == Q.F32  # the router stays F32, as llama.cpp keeps it
    # the LM head one step finer, as llama.cpp's quantizer keeps it (and as our int4 models hold it, in int8)
    assert q4["output.weight"].tensor_type == Q.Q8_0 and q4["blk.0.attn_q.weight"].tensor_type == Q.Q4_0
    kl, _ = kl_top1(logits(model, tokens), logits(mixtral.load_model(tmp_path / "q.gguf", dtype=torch.float32), tokens))
    assert kl < 0.05
