"""Weight-only quantization: the numbers, the kernels against dequantized reference matmuls, quantized
models against their dequantized reference path, and quantized checkpoints round-tripping."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import mixtral
from mixtral.checkpoint import CheckpointError, save_quantized
from mixtral.config import ModelConfig
from mixtral.kernels import cpu as cpu_kernels
from mixtral.kernels.ops import (
    _aten_int4pack_is_ours,
    fp8_matmul,
    fp8_matmul_reference,
    fp8_matmul_unavailable_reason,
    linear,
)
from mixtral.kernels.weights import (
    QuantizedWeight,
    aten_scales_zeros,
    block_major,
    int4_blocks,
    int4_parts,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    rows_groups,
    unpack_int4,
)
from mixtral.quantize import active_weight_bytes, quantize_model, weight_bytes

# Small, but with the shapes int4 needs: output rows in blocks of 64, inputs in whole groups.
CONFIG = ModelConfig(
    dim=128, n_layers=2, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=512, n_experts=4, top_k=2, max_seq_len=64
)
DTYPES = [torch.bfloat16, torch.float32]


def model(dtype=torch.bfloat16, seed: int = 0) -> mixtral.Transformer:
    return tiny_model(CONFIG, seed=seed, dtype=dtype)


def test_int4_packing_is_the_kernels_layout():
    """Our int4pack bytes are what ATen's int4 CPU kernel reads on AVX-512 CPUs (the layout our kernels read too);
    elsewhere ATen's layout differs and `ops` converts to it where our kernels do not run (the matmul tests below
    check the result)."""
    q = torch.randint(0, 16, (192, 96), dtype=torch.int32)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    if _aten_int4pack_is_ours():
        assert torch.equal(pack_int4(q), torch._convert_weight_to_int4pack_for_cpu(q, 1))
    else:
        assert cpu_kernels.isa() != "avx512"  # ATen's AVX-512 kernel reads ours; our AVX2 kernels read ours too
    stacked = torch.randint(0, 16, (3, 64, 32), dtype=torch.int32)
    assert torch.equal(unpack_int4(pack_int4(stacked)), stacked)
    assert torch.equal(pack_int4(stacked)[1], pack_int4(stacked[1]))


def test_int4_scales_are_stored_by_block_of_64_rows():
    """[..., N/64, G, 64, 2]: block b, group g, row r is row 64 b + r's (scale, zero) of group g; ATen's order
    [..., G, N, 2] and the rows' [..., N, G, 2] are the same numbers."""
    w = torch.randn(2, 128, 96)
    _, scale, zero = quantize_int4(w, 32)
    qw = QuantizedWeight.from_float(w, "int4", 32)
    _, sz = int4_parts(qw.blocks, 32, qw.dtype)
    assert sz.shape == (2, 2, 3, 64, 2) and sz.is_contiguous()
    assert torch.equal(sz[1, 1, 2, 5], torch.stack((scale[1, 64 + 5, 2], zero[1, 64 + 5, 2])))
    rows = torch.stack((scale, zero), dim=-1)  # [2, N, G, 2]
    assert torch.equal(rows_groups(sz), rows) and torch.equal(block_major(rows), sz)
    assert torch.equal(aten_scales_zeros(sz), rows.transpose(-2, -3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_blocks_hold_each_groups_int4pack_columns_then_its_scales(dtype):
    """blocks [..., N/64, G, group * 32 + 64 * 2 * itemsize]: block b, group g is the int4pack bytes of columns
    [g * group, (g + 1) * group) of rows [64 b, 64 b + 64), then those rows' (scale, zero) pairs of group g."""
    w = torch.randn(2, 128, 96, dtype=dtype)
    q, scale, zero = quantize_int4(w, 32)
    blocks = QuantizedWeight.from_float(w, "int4", 32).blocks
    assert blocks.shape == (2, 2, 3, 32 * 32 + 128 * dtype.itemsize) and blocks.dtype == torch.uint8
    columns = pack_int4(q[1, 64:128, 64:96])  # block 1, group 2 of matrix 1 packed on its own: [64, 16] bytes
    assert torch.equal(blocks[1, 1, 2, : 32 * 32], columns.view(-1))
    pairs = blocks[1, 1, 2, 32 * 32 :].contiguous().view(dtype).view(64, 2)
    assert torch.equal(pairs, torch.stack((scale[1, 64:128, 2], zero[1, 64:128, 2]), dim=-1))
    packed, sz = int4_parts(blocks, 32, dtype)
    assert torch.equal(packed, pack_int4(q)) and torch.equal(int4_blocks(packed, sz, 32), blocks)


def test_quantizing_leaves_the_weight_as_it_was():
    """The quantizers work in place on a float32 copy: never on a float32 weight itself."""
    w = torch.randn(64, 96)
    before = w.clone()
    quantize_int8(w)
    quantize_int4(w, 32)
    assert torch.equal(w, before)


def test_int8_error_is_at_most_half_a_step():
    w = torch.randn(64, 96) * torch.rand(64, 1) * 3
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()
    assert (q.abs().amax(-1) == 127).all()  # the range is used in full


def test_fp8_error_is_at_most_half_a_step_of_its_exponent():
    w = torch.randn(64, 96) * torch.rand(64, 1) * 3
    q, scale = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    assert (q.float().abs().amax(-1) == 448).all()  # the range is used in full
    # e4m3 has 3 mantissa bits: a value in [2^e, 2^(e+1)) is off by at most 2^(e-4), subnormals by 2^-10
    v = w / scale[:, None]
    step = torch.exp2(torch.floor(torch.log2(v.abs().clamp(min=2.0**-6))) - 3)
    assert ((q.float() - v).abs() <= step / 2 + 1e-6).all()


def test_fp8_matmul_quantizes_the_activations_per_row():
    """fp8 x fp8 products (`fp8_matmul`, torch._scaled_mm; on a GPU from FP8_MATMUL_ROWS rows) against the same
    function in float32, and close to the weight-only product."""
    torch.manual_seed(2)
    qw = QuantizedWeight.from_float(torch.randn(48, 64, dtype=torch.bfloat16), "fp8")
    x = (torch.randn(7, 64) * torch.rand(7, 1) * 10).bfloat16()  # rows of different ranges
    assert fp8_matmul_unavailable_reason(x, qw.view_all()) is None
    got = fp8_matmul(x, qw.view_all())
    ref = fp8_matmul_reference(x, qw.view_all())
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
    weight_only = linear(x, qw).float()
    assert (got.float() - weight_only).norm() / weight_only.norm() < 0.05
    assert "multiples of 16" in fp8_matmul_unavailable_reason(x[:, :40], qw.view_all())


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_error_is_at_most_half_a_step(group_size):
    w = torch.randn(64, 128) + torch.linspace(-2, 2, 128)
    q, scale, zero = quantize_int4(w, group_size)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    s = scale.repeat_interleave(group_size, -1)
    z = zero.repeat_interleave(group_size, -1)
    err = ((q.float() - 8) * s + z - w).abs()
    assert (err <= s / 2 + 1e-5).all()
    with pytest.raises(ValueError, match="not a multiple of the int4 group size"):
        quantize_int4(torch.randn(64, 100), 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_matmul_equals_dequantized_reference(mode, dtype, rows):
    torch.manual_seed(0)
    w = torch.randn(3, 128, 256, dtype=dtype)  # a stack of 3 "experts"
    qw = QuantizedWeight.from_float(w, mode, group_size=64)
    assert qw.shape == w.shape
    x = torch.randn(rows, 256, dtype=dtype)
    for e in range(3):
        ref = F.linear(x.float(), qw[e].dequantize().float())
        got = linear(x, qw[e])
        assert got.dtype == dtype and got.shape == (rows, 128)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        assert torch.allclose(got.float(), ref, rtol=tol, atol=tol * ref.abs().max()), (mode, e)
    # the whole-stack dequantization is the per-matrix one, stacked; and it is close to the original
    assert torch.equal(qw.dequantize(), torch.stack([qw[e].dequantize() for e in range(3)]))
    rel = (qw.dequantize().float() - w.float()).norm() / w.float().norm()
    assert rel < {"int8": 0.01, "fp8": 0.04, "int4": 0.12}[mode]


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_matmul_with_columns_not_a_multiple_of_16(rows):
    # torch._weight_int8pack_mm sums wrongly for such K; the plain path must not use it there
    torch.manual_seed(1)
    qw = QuantizedWeight.from_float(torch.randn(16, 200, dtype=torch.bfloat16), "int8")
    x = torch.randn(rows, 200, dtype=torch.bfloat16)
    ref = F.linear(x.float(), qw.dequantize().float())
    for kernels in (True, False):
        with contextlib.nullcontext() if kernels else cpu_kernels.disabled():
            got = linear(x, qw).float()
        assert torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max()), kernels


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_quantized_model_fast_path_equals_dequantized_reference_path(mode):
    m = model()
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 12))
    with torch.no_grad():
        before = m(tokens).float()
        quantize_model(m, mode, group_size=32)
        assert m.layers[0].moe.w1.mode == mode and m.layers[0].attn.wq.mode == mode
        assert m.output.mode == "int8"  # the LM head: int8 in every mode
        assert isinstance(m.layers[0].moe.gate, torch.nn.Linear)  # the router stays in bf16
        fast = m(tokens).float()
        m.set_moe_impl("reference")
        ref = m(tokens).float()
        # decode of a single token goes through the single-token path: also the same
        m.set_moe_impl("grouped")
        one = m(tokens[:1, :1]).float()
    assert torch.allclose(fast, ref, atol=3e-2 * ref.abs().max())
    assert torch.allclose(one[0, 0], fast[0, 0], atol=3e-2 * ref.abs().max())
    # close to the unquantized model: most next-token choices are the same
    agree = (fast.argmax(-1) == before.argmax(-1)).float().mean()
    assert agree > {"int8": 0.9, "fp8": 0.8, "int4": 0.6}[mode]


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_quantized_weights_are_shaped_as_quantized_ones(mode, dtype):
    """The skeleton a checkpoint fills (`QuantizedWeight.empty`) has the buffers `from_float` makes."""
    for shape in [(192, 96), (3, 64, 128)]:
        made = QuantizedWeight.from_float(torch.randn(shape).to(dtype), mode, 32)
        empty = QuantizedWeight.empty(torch.Size(shape), mode, 32 if mode == "int4" else 0, dtype)
        assert {n: (b.shape, b.dtype) for n, b in made.named_buffers()} == {
            n: (b.shape, b.dtype) for n, b in empty.named_buffers()
        }
        assert all(b.is_meta for b in empty.buffers())
        assert (made.mode, made.group_size, made.dtype, made.shape) == (
            empty.mode,
            empty.group_size,
            empty.dtype,
            empty.shape,
        )


def test_quantized_sizes():
    m = model()
    b16 = weight_bytes(m)
    a16 = active_weight_bytes(m)
    q8 = quantize_model(model(), "int8")
    q4 = quantize_model(model(), "int4", group_size=64)
    assert weight_bytes(q8) < 0.6 * b16 and weight_bytes(q4) < weight_bytes(q8)
    assert active_weight_bytes(q4) < active_weight_bytes(q8) < 0.6 * a16


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(model(), "int3")
    with pytest.raises(ValueError, match="group size 48"):
        quantize_model(model(), "int4", group_size=48)
    m = quantize_model(model(), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(m, "int8")
    tiny = mixtral.Transformer(mixtral.get_preset("tiny"))  # wk has 32 output rows: no int4 blocks of 64
    with pytest.raises(ValueError, match="divisible by 64"):
        quantize_model(tiny, "int4")


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_quantized_checkpoint_round_trips(tmp_path, mode):
    m = quantize_model(model(), mode, group_size=32)
    save_quantized(m, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["mode"] == mode
    loaded = mixtral.load_model(tmp_path / "q")  # load_model recognises quantized checkpoints
    assert loaded.quantization == m.quantization
    a, b = m.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(m(tokens), loaded(tokens))
    with pytest.raises(CheckpointError, match=r"cannot be loaded as torch\.float32"):
        mixtral.load_model(tmp_path / "q", dtype=torch.float32)


@pytest.mark.parametrize("order", ["by block", "aten"])
def test_a_quantized_checkpoint_with_int4_scales_apart_loads_the_same(tmp_path, order):
    """Checkpoints written before the scales went inline hold int4 weights as `packed` (int4pack) and
    `scales_zeros`: by block [..., N/64, G, 64, 2], or (earlier still) in ATen's order [..., G, N, 2]. Both load
    as the same numbers."""
    from safetensors.torch import load_file, save_file

    m = quantize_model(model(), "int4", group_size=32)
    save_quantized(m, tmp_path / "q")
    f = tmp_path / "q" / "model.quantized.safetensors"
    old = {}
    for k, t in load_file(f).items():
        if k.endswith(".blocks"):
            packed, sz = int4_parts(t, 32, torch.bfloat16)
            base = k.removesuffix(".blocks")
            old[base + ".packed"] = packed
            old[base + ".scales_zeros"] = sz if order == "by block" else aten_scales_zeros(sz)
        else:
            old[k] = t
    shape = (4, 4, 128, 2) if order == "aten" else (4, 2, 4, 64, 2)  # [E, G, N, 2] / [E, N/64, G, 64, 2]
    assert old["layers.0.moe.w1.scales_zeros"].shape == shape
    save_file(old, f)
    loaded = mixtral.load_model(tmp_path / "q")
    for k, t in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], t), k


def test_quantized_checkpoint_with_a_missing_tensor_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    save_quantized(quantize_model(model(), "int8"), tmp_path / "q")
    f = tmp_path / "q" / "model.quantized.safetensors"
    state = load_file(f)
    del state["layers.1.moe.w2.scale"]
    save_file(state, f)
    with pytest.raises(CheckpointError, match=r"missing \['layers.1.moe.w2.scale'\]"):
        mixtral.load_model(tmp_path / "q")


def test_generation_with_a_quantized_model_matches_its_reference_path():
    m = quantize_model(model(torch.float32), "int8")
    prompts = [[1, 5, 9, 4], [1, 7]]
    fast = mixtral.generate(m, prompts, max_new_tokens=6)
    m.set_moe_impl("reference")
    ref = mixtral.generate(m, prompts, max_new_tokens=6)
    assert fast == ref


@pytest.mark.parametrize(("mode", "group"), [("int8", 64), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_an_empty_quantized_weight_has_the_buffers_quantizing_gives(mode, group, dtype):
    """`QuantizedWeight.empty` (a skeleton's weights, nothing computed) has the buffers `from_float` makes."""
    w = torch.randn(3, 128, 256, dtype=dtype)
    full, empty = QuantizedWeight.from_float(w, mode, group), QuantizedWeight.empty(w.shape, mode, group, dtype)
    assert {n: (t.shape, t.dtype) for n, t in full.named_buffers()} == {
        n: (t.shape, t.dtype) for n, t in empty.named_buffers()
    }
    assert (empty.mode, empty.group_size, empty.dtype, empty.shape) == (full.mode, full.group_size, full.dtype, w.shape)
    assert all(t.is_meta for t in empty.buffers())
