"""Every checkpoint layout people have, save/load round trips, and a clear error for each bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model, random_tokens
from safetensors.torch import save_file

import mixtral
from mixtral.checkpoint import CheckpointError, half_to_interleaved, interleaved_to_half
from mixtral.model import apply_rope

VOCAB = 320


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(seed=3)


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(VOCAB, batch=2, seq=20, seed=5)


@pytest.fixture(scope="module")
def expected(hf_model, tokens):
    with torch.no_grad():
        return hf_model(tokens).logits


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(path)
    return path


def logits_of(path, tokens, **kwargs):
    model = mixtral.load_model(path, dtype=torch.float32, **kwargs)
    with torch.no_grad():
        return model(tokens)


def assert_close(a, b, atol=1e-4):
    assert (a - b).abs().max().item() <= atol


# ---- layouts ----------------------------------------------------------------------------------------


def test_hf_sharded_with_index(hf_model, tokens, expected, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert_close(logits_of(tmp_path, tokens), expected)


def test_hf_stacked_expert_keys(hf_model, tokens, expected, hf_dir, tmp_path):
    """transformers 5 holds experts stacked (mlp.experts.gate_up_proj / down_proj) in memory."""
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, tmp_path / "model.safetensors")
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    assert_close(logits_of(tmp_path, tokens), expected)


def to_consolidated(hf_dir: Path, out: Path, fmt: str) -> None:
    """Write Mistral's consolidated layout from a HF checkpoint, independently of the loader's code:
    keys renamed, q/k rows gathered back to interleaved pairs by their definition."""
    from safetensors.torch import load_file

    hf = json.loads((hf_dir / "config.json").read_text())
    sd = load_file(hf_dir / "model.safetensors")
    hd = hf["head_dim"] or hf["hidden_size"] // hf["num_attention_heads"]

    def to_interleaved(w, n_heads):
        # consolidated row (h, 2i + j) holds HF row (h, j * hd/2 + i)
        rows = [h * hd + j * (hd // 2) + i for h in range(n_heads) for i in range(hd // 2) for j in range(2)]
        return w[rows].contiguous()

    out_sd = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out_sd[f"layers.{i}.attention.wq.weight"] = to_interleaved(
            sd[p + "self_attn.q_proj.weight"], hf["num_attention_heads"]
        )
        out_sd[f"layers.{i}.attention.wk.weight"] = to_interleaved(
            sd[p + "self_attn.k_proj.weight"], hf["num_key_value_heads"]
        )
        out_sd[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out_sd[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out_sd[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out_sd[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out_sd[f"layers.{i}.feed_forward.gate.weight"] = sd[p + "block_sparse_moe.gate.weight"]
        for e in range(hf["num_local_experts"]):
            for w in ("w1", "w2", "w3"):
                out_sd[f"layers.{i}.feed_forward.experts.{e}.{w}.weight"] = sd[
                    p + f"block_sparse_moe.experts.{e}.{w}.weight"
                ]
    params = {
        "dim": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        "head_dim": hd,
        "hidden_dim": hf["intermediate_size"],
        "n_heads": hf["num_attention_heads"],
        "n_kv_heads": hf["num_key_value_heads"],
        "norm_eps": hf["rms_norm_eps"],
        "vocab_size": hf["vocab_size"],
        "moe": {"num_experts": hf["num_local_experts"], "num_experts_per_tok": hf["num_experts_per_tok"]},
        # no rope_theta: older MoE params.json files lack it, and 1e6 is the default
    }
    out.mkdir(exist_ok=True)
    (out / "params.json").write_text(json.dumps(params))
    if fmt == "safetensors":
        save_file(out_sd, out / "consolidated.safetensors")
    else:
        torch.save(out_sd, out / "consolidated.00.pth")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_consolidated_layout(hf_dir, tokens, expected, tmp_path, fmt):
    to_consolidated(hf_dir, tmp_path, fmt)
    assert_close(logits_of(tmp_path, tokens), expected)


def test_rope_layouts_are_equivalent():
    """Interleaved-pair RoPE (complex multiplication, as in Mistral's code) on the consolidated rows equals
    rotate-half RoPE on the permuted rows: the fact the consolidated loader relies on."""
    torch.manual_seed(0)
    n_heads, hd, dim, T = 3, 8, 16, 5
    w_inter = torch.randn(n_heads * hd, dim)
    x = torch.randn(T, dim)
    pos = torch.arange(T).float()
    freqs = 1.0 / 1e6 ** (torch.arange(0, hd, 2).float() / hd)
    rot = torch.polar(torch.ones(T, hd // 2), pos[:, None] * freqs)  # [T, hd/2]
    q = (x @ w_inter.T).view(T, n_heads, hd // 2, 2)
    q_inter = torch.view_as_real(torch.view_as_complex(q) * rot[:, None]).reshape(T, n_heads, hd)

    w_half = interleaved_to_half(w_inter, n_heads)
    q2 = (x @ w_half.T).view(1, T, n_heads, hd).transpose(1, 2)
    angles = torch.cat([pos[:, None] * freqs] * 2, dim=-1)[None]
    q_half = apply_rope(q2, angles.cos(), angles.sin())[0].transpose(0, 1)  # [T, H, hd]
    # Same dot products between any two positions, head by head: attention scores agree.
    assert torch.allclose(q_inter @ q_inter.transpose(-1, -2), q_half @ q_half.transpose(-1, -2), atol=1e-5)
    # And the rows are literally the same vectors up to the within-head order.
    order = [j * (hd // 2) + i for i in range(hd // 2) for j in range(2)]
    assert torch.allclose(q_inter, q_half[..., order], atol=1e-5)
    assert torch.equal(half_to_interleaved(w_half, n_heads), w_inter)


# ---- saving -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_exact(hf_dir, tmp_path, dtype):
    model = mixtral.load_model(hf_dir, dtype=dtype)
    mixtral.save_model(model, tmp_path / "out")
    again = mixtral.load_model(tmp_path / "out")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype
        assert torch.equal(a[k], b[k]), k


def test_sharded_save_round_trip(hf_dir, tokens, expected, tmp_path):
    model = mixtral.load_model(hf_dir, dtype=torch.float32)
    mixtral.save_model(model, tmp_path / "out", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_close(logits_of(tmp_path / "out", tokens), expected)


def test_transformers_loads_what_we_save(hf_dir, tokens, expected, tmp_path):
    from transformers import MixtralForCausalLM

    mixtral.save_model(mixtral.load_model(hf_dir, dtype=torch.float32), tmp_path / "out")
    theirs = MixtralForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        assert_close(theirs(tokens).logits, expected)


def test_save_replaces_existing_checkpoint(hf_dir, tmp_path):
    model = mixtral.load_model(hf_dir, dtype=torch.float32)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    mixtral.save_model(model, out, overwrite=True)  # stale.txt is not ours: replaced only when asked to
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left behind


def test_crash_during_save_leaves_nothing_half_written(hf_dir, tmp_path, monkeypatch):
    import mixtral.checkpoint.writer as ckpt_mod

    model = mixtral.load_model(hf_dir, dtype=torch.float32)
    out = tmp_path / "out"
    mixtral.save_model(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing_save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        mixtral.save_model(model, out, max_shard_bytes=60_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_load_casts_dtype_and_defaults_to_stored(hf_dir, tmp_path, tokens, expected):
    assert next(mixtral.load_model(hf_dir).parameters()).dtype == torch.float32
    bf16 = mixtral.load_model(hf_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    with torch.no_grad():
        got = bf16(tokens).float()
    # bf16 keeps about 3 significant digits (and a near-tie in the router may flip an expert for a token):
    # the logits stay close on average and the top choices agree
    assert (got - expected).abs().mean().item() < 0.03
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


# ---- bad input ------------------------------------------------------------------------------------------


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(path: Path, change) -> None:
    from safetensors.torch import load_file

    sd = load_file(path / "model.safetensors")
    change(sd)
    save_file(sd, path / "model.safetensors")


def test_missing_tensor(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "c")
    rewrite_weights(path, lambda sd: sd.pop("model.layers.1.block_sparse_moe.experts.5.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing weights for layers\.1\.moe\.w3 \(experts \[5\]\)"):
        mixtral.load_model(path)


def test_unexpected_tensor(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "c")
    rewrite_weights(path, lambda sd: sd.__setitem__("model.layers.0.extra.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.extra\.bias'"):
        mixtral.load_model(path)


def test_misshaped_tensor(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "c")
    rewrite_weights(path, lambda sd: sd.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(16, 64)))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 64\)"):
        mixtral.load_model(path)


def test_truncated_file(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "c")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        mixtral.load_model(path)


def test_corrupt_header(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "c")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:40] = b"#" * 32  # garbage in the JSON header
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        mixtral.load_model(path)


def test_truncated_pth(hf_dir, tmp_path):
    to_consolidated(hf_dir, tmp_path / "c", "pth")
    f = tmp_path / "c" / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth is not a readable PyTorch checkpoint"):
        mixtral.load_model(tmp_path / "c")


def test_config_does_not_match_weights(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json implies .* the config does not match the weights"):
        mixtral.load_model(path)


def test_config_with_more_layers_than_weights(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing weights for layers\.2\."):
        mixtral.load_model(path)


def test_invalid_config_names_the_field(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir, tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: n_heads=4 must be a multiple of n_kv_heads=3"):
        mixtral.load_model(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        mixtral.load_model(path)


def test_missing_shard(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {victim.name}, which is missing"):
        mixtral.load_model(tmp_path)


def test_shard_holding_keys_the_index_puts_elsewhere(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = "model.norm.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][key])
    index["weight_map"][key] = other
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is not listed for this shard"):
        mixtral.load_model(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        mixtral.load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"is not a checkpoint: expected config\.json"):
        mixtral.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="lacks the required field 'hidden_size'"):
        mixtral.load_model(tmp_path)


# ---- the reader of stored tensors ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_the_reader_gives_shapes_dtypes_slices_and_aligned_copies(tmp_path, fmt):
    from mixtral.checkpoint import stored_tensors

    torch.manual_seed(0)
    # an odd-sized tensor first, so that the next one sits at a byte offset no allocator would choose
    tensors = {
        "a.odd": torch.randn(3, dtype=torch.bfloat16),
        "b.q": torch.randint(-127, 128, (4, 6, 10)).to(torch.int8),
    }
    tensors["c.w"] = torch.randn(5, 7)
    path = tmp_path / f"w.{fmt}"
    save_file(tensors, path) if fmt == "safetensors" else torch.save(tensors, path)
    seen = {}
    for key, stored in stored_tensors(path):
        t = tensors[key]
        assert (stored.key, stored.file, stored.shape, stored.dtype) == (key, path, tuple(t.shape), t.dtype)
        assert stored.nbytes == t.numel() * t.element_size()
        assert torch.equal(stored.read(), t)
        index = tuple(slice(1, n) for n in t.shape[:2])
        assert torch.equal(stored.read(index), t[index])
        copy = stored.read_aligned()
        assert torch.equal(copy, t) and copy.data_ptr() % 64 == 0
        seen[key] = stored.bytes_read
    assert seen.keys() == tensors.keys()


def _mapped_from(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process maps the file `path` (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_a_quantized_checkpoint_is_used_in_place_from_its_file(q_hf, tmp_path, mode):
    """Every weight is a view of the file's mapping, 64-byte aligned (as the allocator's memory is), and the model
    computes what the model that was saved does; `in_place=False` reads the same numbers into memory."""
    from mixtral.checkpoint import load_quantized, save_quantized
    from mixtral.quantize import quantize_model

    saved = quantize_model(mixtral.load_model(q_hf[0], dtype=torch.bfloat16), mode, group_size=32)
    save_quantized(saved, tmp_path / "q")
    loaded = mixtral.load_model(tmp_path / "q")
    tensors = [*loaded.parameters(), *loaded.buffers()]
    assert all(t.data_ptr() % 64 == 0 for t in tensors)
    ranges = _mapped_from(Path(loaded.mapped["file"]))
    assert ranges and all(any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in tensors if t.numel())
    assert loaded.mapped["bytes"] == sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
    copied = load_quantized(tmp_path / "q", in_place=False)
    assert copied.mapped["bytes"] == 0
    x = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        want = saved(x)
        assert torch.equal(loaded(x), want) and torch.equal(copied(x), want)


def _vm_flags(address: int) -> set[str]:
    """The kernel's flags of the mapping that holds `address` (/proc/self/smaps' VmFlags)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    return set()


def test_a_mapped_view_is_private_and_unreserved(tmp_path):
    """`StoredTensor.map()` views a copy-on-write mapping of the file, made with MAP_NORESERVE (so a file larger
    than the RAM maps): writing to a view changes neither the file nor another mapping of it."""
    from safetensors.torch import save_file

    from mixtral.checkpoint.reader import stored_tensors

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.float32)}, path)
    before = path.read_bytes()
    ((_, stored),) = stored_tensors(path)
    view = stored.map()
    assert any(lo <= view.data_ptr() < hi for lo, hi in _mapped_from(path))
    assert "nr" in _vm_flags(view.data_ptr())  # VM_NORESERVE: not counted against the RAM + swap
    view.fill_(-1)
    assert path.read_bytes() == before
    ((_, again),) = stored_tensors(path)
    assert torch.equal(again.map(), torch.arange(64, dtype=torch.float32))


def test_write_safetensors_streams_an_aligned_file_that_safetensors_reads(tmp_path):
    from safetensors import safe_open

    from mixtral.checkpoint.writer import ALIGN, write_safetensors

    tensors = {
        "odd": torch.arange(7, dtype=torch.bfloat16),  # 14 bytes: placed after the aligned ones
        "big": torch.arange(64 * 3, dtype=torch.int8).reshape(3, 64),
        "scales": torch.randn(32, dtype=torch.float32),
        "empty": torch.zeros(0, 4, dtype=torch.uint8),
    }
    asked = []

    def produce(key):
        asked.append(key)
        return tensors[key]

    path = tmp_path / "x.safetensors"
    write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, produce, {"format": "pt"})
    assert sorted(asked) == sorted(tensors)  # each produced once
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + n) % ALIGN == 0
    header = json.loads(path.read_bytes()[8 : 8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["big"]["data_offsets"][0] % ALIGN == 0 and header["scales"]["data_offsets"][0] % ALIGN == 0
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    with pytest.raises(ValueError, match=r"'big' is torch\.int8"):
        write_safetensors(path, {"big": (torch.int8, (4, 64))}, produce)


# ---- quantizing while loading ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def q_hf(tmp_path_factory):
    """A HF checkpoint with the shapes int4 takes (output rows in blocks of 64, inputs in whole groups; head_dim 32
    so that a part of 64 rows holds two heads), and the model that wrote it."""
    model = make_hf_model(seed=4, hidden_size=128, intermediate_size=128)
    path = tmp_path_factory.mktemp("hf-q")
    model.save_pretrained(path)
    return path, model


def write_layout(layout: str, q_hf, out: Path) -> Path:
    """The q_hf model's weights in `layout`: HF per expert (as saved), HF stacked, consolidated."""
    path, model = q_hf
    if layout == "hf":
        return path
    if layout == "hf-stacked":
        out.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
        shutil.copy(path / "config.json", out / "config.json")
        return out
    to_consolidated(path, out, layout.removeprefix("consolidated-"))
    return out


@pytest.mark.parametrize("layout", ["hf", "hf-stacked", "consolidated-safetensors", "consolidated-pth"])
@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("part_bytes", [16 << 20, 1])  # each weight in one part; parts of the fewest rows
def test_quantizing_while_loading_gives_the_numbers_of_quantizing_after(
    q_hf, tmp_path, monkeypatch, layout, mode, dtype, part_bytes
):
    """Bit for bit: the int8 scales are per output row and the int4 ones per row and group, so quantizing a few
    rows of one expert at a time changes nothing."""
    import mixtral.checkpoint.load as load_mod
    from mixtral.quantize import quantize_model

    path = write_layout(layout, q_hf, tmp_path / "c")
    monkeypatch.setattr(load_mod, "QUANTIZE_PART_BYTES", part_bytes)
    after = quantize_model(mixtral.load_model(path, dtype=dtype), mode, group_size=32)
    while_loading = mixtral.load_model(path, dtype=dtype, quantize=mode, group_size=32)
    assert while_loading.quantization == after.quantization
    assert while_loading.quantization == {"mode": mode, "group_size": 32 if mode == "int4" else None}
    a, b = after.state_dict(), while_loading.state_dict()
    assert a.keys() == b.keys()
    assert any(k.endswith(".blocks" if mode == "int4" else ".q") for k in b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    # the int8/int4 CPU kernels need 64-byte aligned weights
    assert all(t.data_ptr() % 64 == 0 for t in [*while_loading.parameters(), *while_loading.buffers()])
    assert not while_loading.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_quantizing_while_loading_onto_a_gpu_gives_the_numbers_of_the_cpu(q_hf, mode):
    """Quantized on the GPU as each part arrives (what lets 8x7B int8 load onto one 80 GB GPU): the same numbers as
    on the CPU, and the GPU never holds more than the quantized model and a part."""
    path = q_hf[0]
    on_cpu = mixtral.load_model(path, dtype=torch.bfloat16, quantize=mode, group_size=32)
    torch.cuda.reset_peak_memory_stats()
    on_gpu = mixtral.load_model(path, dtype=torch.bfloat16, device="cuda", quantize=mode, group_size=32)
    size = sum(t.numel() * t.element_size() for t in [*on_gpu.parameters(), *on_gpu.buffers()])
    assert torch.cuda.max_memory_allocated() < size + (64 << 20)
    a, b = on_cpu.state_dict(), on_gpu.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].cpu()) for k in a)


def test_quantizing_while_loading_reads_a_few_rows_at_a_time(q_hf, monkeypatch):
    """Never a whole quantized weight in memory at once: each read of one is at most a part's bytes."""
    import mixtral.checkpoint.load as load_mod
    from mixtral.checkpoint.reader import StoredTensor

    path, _ = q_hf
    part = 64 * 128 * 4  # 64 rows of 128 float32 inputs
    monkeypatch.setattr(load_mod, "QUANTIZE_PART_BYTES", part)
    reads: list[tuple[str, int]] = []
    real_read = StoredTensor.read

    def read(self, index=()):
        t = real_read(self, index)
        reads.append((self.key, t.numel() * t.element_size()))
        return t

    monkeypatch.setattr(StoredTensor, "read", read)
    mixtral.load_model(path, quantize="int4", group_size=32)
    quantized = [(k, n) for k, n in reads if "proj" in k or "experts" in k or k == "lm_head.weight"]
    assert quantized and max(n for _, n in quantized) <= part
    assert len(quantized) > len({k for k, _ in quantized})  # the larger ones in several parts


def test_quantizing_while_loading_keeps_the_clear_errors(q_hf, hf_dir, tmp_path):
    path = copy_ckpt(q_hf[0], tmp_path / "c")
    with pytest.raises(ValueError, match="group size 48"):
        mixtral.load_model(path, quantize="int4", group_size=48)
    with pytest.raises(ValueError, match="unknown quantization"):
        mixtral.load_model(path, quantize="int3")
    with pytest.raises(ValueError, match="divisible by 64"):  # hf_dir's experts have 96 rows
        mixtral.load_model(hf_dir, quantize="int4")
    rewrite_weights(path, lambda sd: sd.pop("model.layers.1.block_sparse_moe.experts.5.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing weights for layers\.1\.moe\.w3 \(experts \[5\]\)"):
        mixtral.load_model(path, quantize="int8")
    rewrite_weights(path, lambda sd: sd.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(16, 128)))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 128\)"):
        mixtral.load_model(path, quantize="int4", group_size=32)


def test_a_quantized_checkpoint_is_not_quantized_again(hf_dir, tmp_path):
    from mixtral.checkpoint import save_quantized

    save_quantized(mixtral.load_model(hf_dir, dtype=torch.bfloat16, quantize="int8"), tmp_path / "q")
    with pytest.raises(CheckpointError, match=r"already quantized \(int8\)"):
        mixtral.load_model(tmp_path / "q", quantize="int8")


def test_save_never_replaces_what_is_not_ours(hf_dir, tmp_path):
    from mixtral.checkpoint import OutputExistsError, save_quantized
    from mixtral.quantize import quantize_model

    model = mixtral.load_model(hf_dir, dtype=torch.float32)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    a_file = tmp_path / "a.bin"
    a_file.write_bytes(b"mine")
    ours_plus = tmp_path / "ours-plus"
    mixtral.save_model(model, ours_plus)
    (ours_plus / "README.md").write_text("mine")  # a previous output with a file of the user's in it
    for path, what in ((notes, "a folder"), (a_file, "a file"), (ours_plus, "a folder")):
        with pytest.raises(OutputExistsError, match=re.escape(f"{path} is {what}")) as e:
            mixtral.save_model(model, path)
        assert "overwrite=True" in str(e.value)
    with pytest.raises(OutputExistsError, match=r"todo\.txt"):
        save_quantized(quantize_model(mixtral.load_model(hf_dir, dtype=torch.float32), "int8"), notes)
    assert (notes / "todo.txt").read_text() == "mine" and a_file.read_bytes() == b"mine"
    assert (ours_plus / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "notes", "ours-plus"]  # nothing left behind
    # overwrite=True replaces a folder or a file
    for path in (notes, a_file):
        mixtral.save_model(model, path, overwrite=True)
        assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "notes", "ours-plus"]


def test_save_replaces_a_previous_output_of_ours(hf_dir, tmp_path):
    from mixtral.checkpoint import save_quantized
    from mixtral.quantize import quantize_model

    model = mixtral.load_model(hf_dir, dtype=torch.float32)
    out = tmp_path / "out"
    out.mkdir()  # an empty folder holds nothing to lose
    mixtral.save_model(model, out)
    (out / "tokenizer.model").write_bytes(b"x")  # as `train` leaves its model/
    mixtral.save_model(model, out, max_shard_bytes=60_000)  # sharded, with an index
    assert (out / "model.safetensors.index.json").is_file() and not (out / "tokenizer.model").exists()
    save_quantized(quantize_model(mixtral.load_model(hf_dir, dtype=torch.float32), "int8"), out)
    assert (out / "quantization.json").is_file()
    mixtral.save_model(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_memory_fit_says_what_fits_and_what_a_larger_model_does(monkeypatch, q_hf, tmp_path, capsys):
    import mixtral.checkpoint.load as load_mod
    from mixtral.checkpoint import save_quantized
    from mixtral.quantize import quantize_model

    monkeypatch.setattr(load_mod, "ram_available", lambda: 20 * 10**9)
    assert "fits in the 20.00 GB of RAM available" in load_mod.memory_fit(10**9, in_place=True)
    larger = load_mod.memory_fit(25 * 10**9, in_place=True)
    assert "more than the 20.00 GB" in larger and "about 80% can stay in memory" in larger
    assert "it will not load" in load_mod.memory_fit(25 * 10**9, in_place=False)
    # loading a quantized checkpoint larger than the RAM available says so (and loads)
    save_quantized(quantize_model(mixtral.load_model(q_hf[0]), "int8"), tmp_path / "q")
    monkeypatch.setattr(load_mod, "ram_available", lambda: 1000)
    assert mixtral.load_model(tmp_path / "q").mapped["bytes"] > 1000
    assert "used in place from the file, more than the 0.00 GB of RAM available" in capsys.readouterr().err
