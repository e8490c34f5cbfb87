"""Expert and tensor parallelism on 2 CPU processes (gloo) against the same model in one process: logits,
greedy generation, training steps (losses and gradients), per-rank loading of every checkpoint layout,
and clear errors for layouts that cannot work.

The 2-process runs are costly to start, so one pair of spawned workers runs every scenario once (module
fixture) and each test checks its own scenario's outcome.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

import mixtral
from mixtral.checkpoint import CheckpointError, half_to_interleaved
from mixtral.config import ModelConfig
from mixtral.model import Transformer
from mixtral.parallel import (
    ParallelError,
    check_layout,
    gather_model,
    load_model_parallel,
    parallelize,
    reduce_gradients,
)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

CONFIG = ModelConfig(
    dim=32, n_layers=2, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=96, n_experts=4, top_k=2, max_seq_len=64
)
SWA_CONFIG = CONFIG.replace(sliding_window=6)
WORLD = 2
ATOL = 1e-5


def tiny_model(config: ModelConfig = CONFIG, seed: int = 0) -> Transformer:
    """Random weights of unit-scale activations and a decisive router (each token really picks its experts)."""
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("gate.weight"):
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model.eval()


# ---- the workers ---------------------------------------------------------------------------------------------


def _shard_of(full: torch.Tensor, name: str, model: Transformer) -> torch.Tensor:
    slices = model.parallel.layout.shard(name, full.shape, model.parallel.config)
    return full[slices]


def _max_param_diff(par: Transformer, ref: Transformer) -> tuple[float, str]:
    """The largest difference between a rank's parameters and its slices of the reference's, and where."""
    worst, where = 0.0, ""
    ref_params = dict(ref.named_parameters())
    for name, p in par.named_parameters():
        diff = (p.detach() - _shard_of(ref_params[name].detach(), name, par)).abs().max().item()
        if diff > worst:
            worst, where = diff, name
    return worst, where


def scenario_ep_logits(rank: int, ckpts: dict) -> dict:
    ref = tiny_model()
    par = parallelize(copy.deepcopy(ref), ep=2)
    assert [p.shape[0] for n, p in par.named_parameters() if n.endswith("moe.w1")] == [2, 2]
    out = {}
    for shape in ((2, 10), (1, 9), (3, 1)):  # odd token counts: the ranks' chunks differ in size
        tokens = torch.randint(0, CONFIG.vocab_size, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            out[str(shape)] = (par(tokens) - ref(tokens)).abs().max().item()
    # Each rank with its own tokens (sharded): each gets its own rows' logits.
    sharded = parallelize(copy.deepcopy(ref), ep=2, tokens="sharded")
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        mine = tokens[rank : rank + 1, : 7 - 2 * rank]  # different lengths on the two ranks
        out["sharded"] = (sharded(mine) - ref(mine)).abs().max().item()
    return out


def scenario_tp_logits(rank: int, ckpts: dict) -> dict:
    ref = tiny_model()
    par = parallelize(copy.deepcopy(ref), tp=2)
    assert par.layers[0].attn.wq.weight.shape[0] == CONFIG.n_heads * CONFIG.head_dim // 2
    assert par.layers[0].moe.w2.shape == (CONFIG.n_experts, CONFIG.dim, CONFIG.hidden_dim // 2)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return {"logits": (par(tokens) - ref(tokens)).abs().max().item()}


def scenario_generate(rank: int, ckpts: dict) -> dict:
    prompts = [[1, 5, 9, 33, 60, 5, 7], [1, 40], [1, 17, 18, 19, 80, 81, 82, 83, 84, 85, 11]]
    out = {}
    for label, config, kwargs in (
        ("ep", CONFIG, {"ep": 2}),
        ("tp", CONFIG, {"tp": 2}),
        ("tp-swa", SWA_CONFIG, {"tp": 2}),  # rolling-buffer cache with this rank's heads only
        ("ep-swa", SWA_CONFIG, {"ep": 2}),
    ):
        ref = tiny_model(config)
        par = parallelize(copy.deepcopy(ref), **kwargs)
        want = mixtral.generate(ref, prompts, max_new_tokens=12, eos_id=None)
        got = mixtral.generate(par, prompts, max_new_tokens=12, eos_id=None)
        out[label] = {"want": want, "got": got}
    return out


def _train(model: Transformer, batches: list[torch.Tensor]) -> dict:
    """A few AdamW steps of next-token cross-entropy; the losses and the gradients (before each step).
    With tokens="sharded" each EP rank takes its part of every batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    state = getattr(model, "parallel", None)
    sharded = state is not None and state.tokens == "sharded"
    losses, grads = [], []
    for batch in batches:
        if sharded:
            part = batch.shape[0] // state.layout.ep
            batch = batch[state.layout.ep_rank * part : (state.layout.ep_rank + 1) * part]
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        if sharded:
            reduce_gradients(model)
            loss = loss.detach().clone()
            dist.all_reduce(loss)  # TP ranks hold equal losses: the mean over all ranks is the EP mean
            loss /= dist.get_world_size()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return {"losses": losses, "grads": grads, "model": model}


def scenario_train(rank: int, ckpts: dict, layouts: tuple = ()) -> dict:
    g = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, CONFIG.vocab_size, (4, 9), generator=g)] * 3  # the same batch: the loss must fall
    ref = _train(tiny_model(), batches)
    out = {}
    for label, kwargs in layouts or (
        ("ep-sharded", {"ep": 2, "tokens": "sharded"}),  # data parallel over the EP group
        ("ep-replicated", {"ep": 2}),
        ("tp", {"tp": 2}),
    ):
        par = _train(parallelize(tiny_model(), **kwargs), batches)
        model = par["model"]
        grad_diffs, wheres = [], []  # per step: the largest difference, and where
        for gp, gr in zip(par["grads"], ref["grads"], strict=True):
            diffs = {name: (grad - _shard_of(gr[name], name, model)).abs().max().item() for name, grad in gp.items()}
            wheres.append(max(diffs, key=diffs.get))
            grad_diffs.append(diffs[wheres[-1]])
        param_diff, pwhere = _max_param_diff(model, ref["model"])
        out[label] = {
            "losses": par["losses"],
            "want_losses": ref["losses"],
            "grad_diffs": grad_diffs,
            "grad_wheres": wheres,
            "param_diff": param_diff,
            "param_where": pwhere,
        }
    return out


def scenario_load(rank: int, ckpts: dict) -> dict:
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5))
    out = {}
    for layout, path in ckpts.items():
        if layout.startswith("broken"):
            try:
                load_model_parallel(path, ep=2)
                out[layout] = "loaded"
            except CheckpointError as e:
                out[layout] = str(e)
            continue
        ref = mixtral.load_model(path, dtype=torch.float32)
        with torch.no_grad():
            want = ref(tokens)
        for ep, tp in ((2, 1), (1, 2)):
            par = load_model_parallel(path, ep=ep, tp=tp, dtype=torch.float32)
            with torch.no_grad():
                logits = (par(tokens) - want).abs().max().item()
            own_bytes = sum(p.numel() * 4 for p in par.parameters())  # float32 on disk
            whole = gather_model(par)  # the shards put back together, on rank 0
            gathered = (
                None
                if whole is None
                else max((a - b).abs().max().item() for a, b in zip(whole.parameters(), ref.parameters(), strict=True))
            )
            out[f"{layout} ep={ep} tp={tp}"] = {
                "gathered": gathered,
                "logits": logits,
                "param_diff": _max_param_diff(par, ref)[0],
                "bytes_read": par.parallel.bytes_read,
                "own_bytes": own_bytes,
                "full_bytes": sum(p.numel() * 4 for p in ref.parameters()),
            }
    return out


def scenario_ep_tp(rank: int, ckpts: dict) -> dict:
    """ep=2 x tp=2 on 4 processes: experts split both ways, attention over TP, the all-to-all over EP."""
    ref = tiny_model()
    par = parallelize(copy.deepcopy(ref), ep=2, tp=2)
    assert par.layers[0].moe.w1.shape == (2, CONFIG.hidden_dim // 2, CONFIG.dim)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = {"logits": (par(tokens) - ref(tokens)).abs().max().item()}
    prompts = [[1, 5, 9, 33, 60, 7], [1, 40]]
    out["generate"] = {
        "want": mixtral.generate(ref, prompts, max_new_tokens=8, eos_id=None),
        "got": mixtral.generate(par, prompts, max_new_tokens=8, eos_id=None),
    }
    out["train"] = scenario_train(
        rank,
        ckpts,
        layouts=(("sharded", {"ep": 2, "tp": 2, "tokens": "sharded"}), ("replicated", {"ep": 2, "tp": 2})),
    )
    return out


SCENARIOS = {
    "ep_logits": scenario_ep_logits,
    "tp_logits": scenario_tp_logits,
    "generate": scenario_generate,
    "train": scenario_train,
    "load": scenario_load,
    "ep_tp": scenario_ep_tp,
}


def _worker(rank: int, world: int, port: int, out_dir: str, scenarios: list[str], ckpts: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from mixtral.parallel import init_distributed

    results: dict = {}
    try:
        device = init_distributed("cpu", timeout=timedelta(seconds=60))
        assert device == torch.device("cpu") and dist.get_backend() == "gloo"
        for name in scenarios:
            fn = SCENARIOS[name]
            try:
                results[name] = {"ok": True, "value": fn(rank, ckpts)}
            except Exception:
                results[name] = {"ok": False, "error": traceback.format_exc()}
            # Stop at the first failure on any rank: later collectives would be out of step.
            failed = torch.tensor([0 if results[name]["ok"] else 1])
            dist.all_reduce(failed)
            if failed.item():
                break
    except Exception:
        results["_setup"] = {"ok": False, "error": traceback.format_exc()}
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- checkpoints in every layout, from one tiny model ---------------------------------------------------------


def _write_checkpoints(root: Path) -> dict[str, str]:
    model = tiny_model(seed=4)
    params = dict(model.named_parameters())
    paths = {}
    hf = root / "hf-sharded"
    mixtral.save_model(model, hf, max_shard_bytes=40_000)  # several shards + index
    assert (hf / "model.safetensors.index.json").is_file()
    paths["hf-sharded"] = hf

    stacked = root / "hf-stacked"
    stacked.mkdir()
    (stacked / "config.json").write_text((hf / "config.json").read_text())
    sd = {"model.embed_tokens.weight": params["embed.weight"], "model.norm.weight": params["norm.weight"]}
    sd["lm_head.weight"] = params["output.weight"]
    hf_names = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}
    for i in range(CONFIG.n_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for hf_name, ours in hf_names.items():
            sd[p + f"self_attn.{hf_name}.weight"] = params[q + f"attn.{ours}.weight"]
        sd[p + "input_layernorm.weight"] = params[q + "attn_norm.weight"]
        sd[p + "post_attention_layernorm.weight"] = params[q + "ffn_norm.weight"]
        sd[p + "mlp.gate.weight"] = params[q + "moe.gate.weight"]
        sd[p + "mlp.experts.gate_up_proj"] = torch.cat((params[q + "moe.w1"], params[q + "moe.w3"]), dim=1)
        sd[p + "mlp.experts.down_proj"] = params[q + "moe.w2"]
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    save_file(sd, stacked / "model.safetensors")
    paths["hf-stacked"] = stacked
    broken = {
        "missing": {k: v for k, v in sd.items() if k != "model.layers.1.mlp.experts.down_proj"},
        "unexpected": {**sd, "model.layers.0.mlp.extra.weight": torch.zeros(2)},
        "misshaped": {**sd, "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 90, 32)},
    }
    for name, state in broken.items():
        d = root / f"broken-{name}"
        d.mkdir()
        (d / "config.json").write_text((hf / "config.json").read_text())
        save_file(state, d / "model.safetensors")
        paths[f"broken-{name}"] = d

    cons = {"tok_embeddings.weight": params["embed.weight"], "norm.weight": params["norm.weight"]}
    cons["output.weight"] = params["output.weight"]
    for i in range(CONFIG.n_layers):
        q = f"layers.{i}."
        cons[q + "attention.wq.weight"] = half_to_interleaved(params[q + "attn.wq.weight"], CONFIG.n_heads)
        cons[q + "attention.wk.weight"] = half_to_interleaved(params[q + "attn.wk.weight"], CONFIG.n_kv_heads)
        cons[q + "attention.wv.weight"] = params[q + "attn.wv.weight"]
        cons[q + "attention.wo.weight"] = params[q + "attn.wo.weight"]
        cons[q + "attention_norm.weight"] = params[q + "attn_norm.weight"]
        cons[q + "ffn_norm.weight"] = params[q + "ffn_norm.weight"]
        cons[q + "feed_forward.gate.weight"] = params[q + "moe.gate.weight"]
        for e in range(CONFIG.n_experts):
            for w in ("w1", "w2", "w3"):
                cons[q + f"feed_forward.experts.{e}.{w}.weight"] = params[q + f"moe.{w}"][e]
    cons = {k: v.detach().contiguous().clone() for k, v in cons.items()}
    for fmt in ("safetensors", "pth"):
        d = root / f"mistral-{fmt}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps(CONFIG.to_mistral()))
        if fmt == "safetensors":
            save_file(cons, d / "consolidated.safetensors")
        else:
            torch.save(cons, d / "consolidated.00.pth")
        paths[f"mistral-{fmt}"] = d
    return {k: str(v) for k, v in paths.items()}


def _launch(world: int, scenarios: list[str], root: Path, ckpts: dict) -> dict:
    """Run the scenarios in `world` spawned processes (gloo); their results, rank by rank."""
    out_dir = root / f"results-{world}"
    out_dir.mkdir()
    ctx = mp.get_context("spawn")
    port = _free_port()
    args = (world, port, str(out_dir), scenarios, ckpts)
    procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    per_rank = []
    for r in range(world):
        f = out_dir / f"rank{r}.json"
        assert f.is_file(), f"worker {r} wrote no results (exit code {procs[r].exitcode})"
        per_rank.append(json.loads(f.read_text()))
    return {"ranks": per_rank}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("parallel")
    return _launch(WORLD, ["ep_logits", "tp_logits", "generate", "train", "load"], root, _write_checkpoints(root))


@pytest.fixture(scope="module")
def results4(tmp_path_factory) -> dict:
    return _launch(4, ["ep_tp"], tmp_path_factory.mktemp("parallel4"), {})


def outcome(results: dict, name: str) -> list:
    """The scenario's value on each rank; fails the test with the worker's traceback if it failed."""
    values = []
    for rank, res in enumerate(results["ranks"]):
        if "_setup" in res:
            pytest.fail(f"rank {rank} could not set up:\n{res['_setup']['error']}")
        if name not in res:
            failed = [f"{k}:\n{v['error']}" for k, v in res.items() if not v["ok"]]
            pytest.fail(f"scenario {name} did not run on rank {rank}; an earlier one failed: {failed}")
        if not res[name]["ok"]:
            pytest.fail(f"scenario {name} failed on rank {rank}:\n{res[name]['error']}")
        values.append(res[name]["value"])
    return values


# ---- the tests ---------------------------------------------------------------------------------------------------


def test_ep_logits_equal_single_process(results):
    for rank, diffs in enumerate(outcome(results, "ep_logits")):
        for case, diff in diffs.items():
            assert diff <= ATOL, f"rank {rank}, tokens {case}: logits differ by {diff}"


def test_tp_logits_equal_single_process(results):
    for rank, diffs in enumerate(outcome(results, "tp_logits")):
        assert diffs["logits"] <= ATOL, f"rank {rank}: logits differ by {diffs['logits']}"


@pytest.mark.parametrize("layout", ["ep", "tp", "tp-swa", "ep-swa"])
def test_greedy_generation_equals_single_process(results, layout):
    for rank, out in enumerate(outcome(results, "generate")):
        assert out[layout]["got"] == out[layout]["want"], f"rank {rank}"
        assert all(len(seq) == 12 for seq in out[layout]["got"])


@pytest.mark.parametrize("layout", ["ep-sharded", "ep-replicated", "tp"])
def test_training_steps_equal_single_process(results, layout):
    for rank, out in enumerate(outcome(results, "train")):
        r = out[layout]
        assert r["losses"] == pytest.approx(r["want_losses"], abs=ATOL), f"rank {rank}"
        assert r["want_losses"][-1] < r["want_losses"][0]  # the steps do train
        _check_grads(r, f"rank {rank}")
        assert r["param_diff"] <= 1e-3, f"rank {rank}: weights differ by {r['param_diff']} at {r['param_where']}"


def _check_grads(r: dict, who: str) -> None:
    # The first step's gradients come from identical weights: they must agree to rounding. Adam divides each
    # update by the gradient's own size, so rounding differences in near-zero gradients grow into the
    # weights, and from them into the later steps' gradients: those are checked more loosely.
    for step, (diff, where) in enumerate(zip(r["grad_diffs"], r["grad_wheres"], strict=True)):
        tol = ATOL if step == 0 else 1e-4
        assert diff <= tol, f"{who}, step {step}: gradients differ by {diff} at {where}"


@pytest.mark.parametrize("layout", ["hf-sharded", "hf-stacked", "mistral-safetensors", "mistral-pth"])
def test_each_rank_reads_only_its_shard(results, layout):
    for rank, out in enumerate(outcome(results, "load")):
        for ep, tp in ((2, 1), (1, 2)):
            r = out[f"{layout} ep={ep} tp={tp}"]
            assert r["param_diff"] == 0.0, f"rank {rank} ep={ep} tp={tp}: weights differ from load_model's"
            assert r["logits"] <= ATOL, f"rank {rank} ep={ep} tp={tp}: logits differ by {r['logits']}"
            assert r["bytes_read"] == r["own_bytes"] < r["full_bytes"], f"rank {rank} ep={ep} tp={tp}: {r}"
            assert r["gathered"] == (0.0 if rank == 0 else None), "gather_model gives back the whole model"


def test_ep_and_tp_together_on_4_processes(results4):
    for rank, out in enumerate(outcome(results4, "ep_tp")):
        assert out["logits"] <= ATOL, f"rank {rank}: logits differ by {out['logits']}"
        assert out["generate"]["got"] == out["generate"]["want"], f"rank {rank}"
        for label, r in out["train"].items():
            assert r["losses"] == pytest.approx(r["want_losses"], abs=ATOL), f"rank {rank} {label}"
            _check_grads(r, f"rank {rank} {label}")


@pytest.mark.parametrize(
    "broken,message",
    [
        ("missing", r"missing weights for layers\.1\.moe\.w2"),
        ("unexpected", r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"),
        ("misshaped", r"'model\.layers\.0\.mlp\.experts\.gate_up_proj' has shape \(4, 90, 32\)"),
    ],
)
def test_per_rank_loading_stays_strict(results, broken, message):
    """Every rank checks every tensor, its own or not: a bad checkpoint fails on all ranks alike."""
    for rank, out in enumerate(outcome(results, "load")):
        assert re.search(message, out[f"broken-{broken}"]), f"rank {rank}: {out[f'broken-{broken}']}"


# ---- impossible layouts (no processes needed: checked before any communication) --------------------------------


def test_experts_not_divisible_by_ep():
    with pytest.raises(ParallelError, match=r"cannot split n_experts=4 over ep=3 ranks.*one of 1, 2, 4"):
        check_layout(CONFIG, ep=3, tp=1)


def test_heads_not_divisible_by_tp():
    with pytest.raises(ParallelError, match=r"cannot split n_kv_heads=2 over tp=4 ranks.*one of 1, 2"):
        check_layout(CONFIG, ep=1, tp=4)
    with pytest.raises(ParallelError, match=r"cannot split n_heads=6 over tp=4"):
        check_layout(CONFIG.replace(n_heads=6, n_kv_heads=6, head_dim=8), ep=1, tp=4)


def test_hidden_dim_not_divisible_by_tp():
    with pytest.raises(ParallelError, match=r"hidden_dim=50 over tp=4"):
        check_layout(CONFIG.replace(hidden_dim=50, n_kv_heads=4), ep=1, tp=4)


def test_world_size_must_be_ep_times_tp():
    with pytest.raises(ParallelError, match=r"ep=2 x tp=2 needs 4 processes, but the process group has 2"):
        check_layout(CONFIG, ep=2, tp=2, world_size=2)
    with pytest.raises(ParallelError, match=r"ep must be a positive integer, got 0"):
        check_layout(CONFIG, ep=0, tp=1)


def test_parallelize_refuses_bad_layouts_before_needing_processes(tmp_path):
    with pytest.raises(ParallelError, match=r"n_experts=4 over ep=8"):
        parallelize(tiny_model(), ep=8)
    with pytest.raises(ParallelError, match=r"tokens='all' is not one of"):
        parallelize(tiny_model(), ep=2, tokens="all")
    with pytest.raises(ParallelError, match=r"no process group: call mixtral.parallel.init_distributed"):
        parallelize(tiny_model(), ep=2)
    mixtral.save_model(tiny_model(), tmp_path / "ckpt")
    with pytest.raises(ParallelError, match=r"cannot split n_heads=4 over tp=8"):
        load_model_parallel(tmp_path / "ckpt", tp=8)


def test_init_distributed_needs_torchrun(monkeypatch):
    from mixtral.parallel import init_distributed

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ParallelError, match=r"runs under torchrun.*torchrun --nproc-per-node N -m mixtral"):
        init_distributed()
