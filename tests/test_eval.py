"""Evaluation with lm-eval (EleutherAI's lm-evaluation-harness) against `mixtral serve`: its `local-completions`
model scores loglikelihood requests (multiple choice, perplexity) from the prompt's logprobs (echo) and runs
generate_until requests, and the numbers are the model's own, computed here. The server runs in this process
(uvicorn on a thread, on a free port) on the tiny model; lm-eval is an optional extra (`pip install
'mixtral[eval]'`): skipped without it."""

from __future__ import annotations

import importlib.util
import threading
import time

import pytest
import torch

import mixtral
from mixtral.generate import generate_stream
from mixtral.sampling import SamplingParams
from mixtral.serve import Engine, create_app


def import_lm_eval():
    """lm_eval, or a skip. lm-eval 0.4.9 names transformers' `AutoModelForVision2Seq` as it imports, which
    transformers 5 renamed `AutoModelForImageTextToText`: given the new name under the old (peft is imported first,
    as it re-imports transformers' module)."""
    if importlib.util.find_spec("lm_eval") is None:  # (importing it here would fail as said above)
        pytest.skip("lm-eval is not installed (pip install 'mixtral[eval]')")
    import peft  # noqa: F401
    import transformers

    if not hasattr(transformers, "AutoModelForVision2Seq"):
        transformers.AutoModelForVision2Seq = transformers.AutoModelForImageTextToText
    import lm_eval

    return lm_eval


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model and our tokenizer, and a folder with the tokenizer's files (lm-eval tokenizes with
    transformers' AutoTokenizer)."""
    torch.manual_seed(0)
    model, tok = mixtral.Transformer(mixtral.get_preset("tiny")).eval(), mixtral.load_tokenizer()
    path = tmp_path_factory.mktemp("tiny")
    mixtral.save_model(model, path, tokenizer=tok)
    return model, tok, path


@pytest.fixture(scope="module")
def server_url(tiny):
    import uvicorn

    model, tok, _ = tiny
    engine = Engine(lambda: (model, tok), max_batch=4, prefill_chunk=8)  # prompts in several chunks
    app = create_app(engine, model_name="tiny")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 600  # a first run builds the CPU kernels (minutes on a busy machine)
    while not (server.started and engine.state == "ready") and time.monotonic() < deadline:
        assert thread.is_alive() and engine.state in ("loading", "ready")
        time.sleep(0.02)
    assert engine.state == "ready"
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def own_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """(log P(continuation | context), whether it is the greedy continuation) from one forward pass here, the
    text split into tokens as lm-eval does: the whole text's tokens (no BOS), the context's first."""
    whole = tok.encode(context + continuation, bos=False)
    n_context = len(tok.encode(context, bos=False))
    with torch.no_grad():
        logp_TV = torch.log_softmax(model(torch.tensor([whole]))[0].float(), -1)
    rows = range(n_context - 1, len(whole) - 1)  # row j predicts token j + 1
    total = sum(logp_TV[j, whole[j + 1]].item() for j in rows)
    greedy = all(logp_TV[j].argmax().item() == whole[j + 1] for j in rows)
    return total, greedy


def test_lm_eval_local_completions_against_the_server(tiny, server_url):
    import_lm_eval()
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    model, tok, path = tiny
    lm = LocalCompletionsAPI(
        base_url=server_url + "/v1/completions",
        model="tiny",
        tokenizer=str(path),
        tokenizer_backend="huggingface",
        batch_size=2,  # two prompts per request
        max_length=256,
        max_retries=1,
    )
    # A multiple-choice question as lm-eval asks it: one loglikelihood request per choice.
    pairs = [
        ("The capital of France is", " Paris"),
        ("The capital of France is", " a large city by the river"),
        ("Question: what is two plus two?\nAnswer:", " four"),
    ]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        want, want_greedy = own_loglikelihood(model, tok, context, continuation)
        assert logprob == pytest.approx(want, abs=1e-4) and greedy == want_greedy

    # generate_until: greedy text up to a stop string, as `mixtral generate` gives it.
    context = "Once upon a time"
    gen = Instance(
        request_type="generate_until",
        doc={},
        arguments=(context, {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}),
        idx=0,
    )
    [text] = lm.generate_until([gen], disable_tqdm=True)
    params = SamplingParams(max_new_tokens=8, stop=("\n\n", "</s>"))  # lm-eval adds the EOS text as a stop
    events = generate_stream(model, [tok.encode(context, bos=False)], params, tokenizer=tok, eos_id=tok.eos_id)
    assert text == "".join(ev.text for ev in events)


# ---- `mixtral eval`: lm-eval in process, through our own model class --------------------------------------------

# The questions above as lm-eval tasks of local data: a multiple-choice task (loglikelihood requests; lm-eval puts
# its target delimiter " " between question and choice) and a generation task.
MC_DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "a large city by the river"], "answer": 0},
    {"question": "Question: what is two plus two?\nAnswer:", "choices": ["four", "five"], "answer": 0},
]
GEN_DOCS = [
    {"prompt": "Once upon a time", "target": "there"},
    {"prompt": "The capital of France is", "target": "Paris"},
]
TASKS = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
---
task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("tasks")
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for i, text in enumerate(TASKS.format(dir=path).split("---\n")):
        (path / f"task{i}.yaml").write_text(text)
    return path


def responses(results: dict, task: str) -> list:
    """Each request's answer, in document and request order."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [r[0] for s in samples for r in s["resps"]]  # one response per request (no repeats)


def test_mixtral_eval_in_process_equals_the_server_path(tiny, server_url, task_dir):
    import_lm_eval()
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from mixtral.eval import lm

    model, tok, path = tiny
    ours = lm.evaluate(lm.MixtralLM(model, tok, batch_size=3), ["tiny_mc", "tiny_gen"], include_path=task_dir)
    api = LocalCompletionsAPI(
        base_url=server_url + "/v1/completions", model="tiny", tokenizer=str(path), tokenizer_backend="huggingface",
        batch_size=2, max_length=256, max_retries=1,
    )  # fmt: skip
    served = lm.evaluate(api, ["tiny_mc", "tiny_gen"], include_path=task_dir)
    got, want = responses(ours, "tiny_mc"), responses(served, "tiny_mc")
    assert len(got) == len(want) == 4
    for (lp, greedy), (lp_s, greedy_s) in zip(got, want, strict=True):
        assert lp == pytest.approx(lp_s, abs=1e-4) and greedy == greedy_s
    # and the model's own numbers: the first choice of the first question, from one forward pass here
    want0, _ = own_loglikelihood(model, tok, MC_DOCS[0]["question"], " " + MC_DOCS[0]["choices"][0])
    assert got[0][0] == pytest.approx(want0, abs=1e-4)
    assert responses(ours, "tiny_gen") == responses(served, "tiny_gen")
    for task, metric in (("tiny_mc", "acc,none"), ("tiny_gen", "exact_match,none")):
        assert ours["results"][task][metric] == served["results"][task][metric]


def test_loglikelihood_rolling_is_the_texts_own(tiny):
    import_lm_eval()
    from lm_eval.api.instance import Instance

    from mixtral.eval import lm

    model, tok, _ = tiny
    text = "It was the best of times, it was the worst of times."
    harness = lm.MixtralLM(model, tok, batch_size=2, max_length=6)  # several windows
    [got] = harness.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [tok.bos_id, *tok.encode(text, bos=False)]
    with torch.no_grad():  # every token after <s>, each given all before it (the windows see at most 6)
        whole = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    full = sum(whole[j, ids[j + 1]].item() for j in range(len(ids) - 1))
    assert got < 0 and abs(got - full) < 0.5 * abs(full)  # windows cut the context: close, not equal
    [exact] = lm.MixtralLM(model, tok, batch_size=2).loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)]
    )
    assert exact == pytest.approx(full, abs=1e-4)


def test_mixtral_eval_command(tiny, task_dir, tmp_path, capsys):
    import_lm_eval()
    import json

    from mixtral.cli import main

    _, _, path = tiny
    out = tmp_path / "res" / "results.json"
    argv = ["eval", "--checkpoint", str(path), "--include-path", str(task_dir), "--tasks", "tiny_mc,tiny_gen",
            "--limit", "1", "--batch-size", "2", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"tiny_mc", "tiny_gen"} and "acc,none" in results["results"]["tiny_mc"]
    assert "tiny_mc" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temporary file left
    assert main(["eval", "--checkpoint", str(path), "--tasks", "no_such_task_xyz"]) == 2
    assert "unknown lm-eval tasks ['no_such_task_xyz']" in capsys.readouterr().err


def test_mixtral_eval_with_a_lora_adapter_scores_the_adapted_model(tiny, task_dir, tmp_path):
    """`mixtral eval --lora DIR` scores the model with the adapter on it (applied without merging): the loglikelihoods
    of the adapter merged into a copy of the model, evaluated in process, and not the base model's."""
    import_lm_eval()
    import copy
    import json

    from mixtral.cli import main
    from mixtral.eval import lm
    from mixtral.serve.adapters import merged_reference
    from mixtral.train.lora import apply_lora, save_adapter

    model, tok, path = tiny
    adapted = copy.deepcopy(model)
    torch.manual_seed(12)
    for p in apply_lora(adapted, 4, 8.0, ("wq", "wv", "w1", "w2")):
        if p.abs().sum() == 0:  # B: a trained adapter is not zero
            p.data.normal_(0.0, 0.3)
    adapter = tmp_path / "adapter"
    save_adapter(adapted, adapter)
    out = tmp_path / "results.json"
    argv = ["eval", "--checkpoint", str(path), "--include-path", str(task_dir), "--tasks", "tiny_mc",
            "--batch-size", "2", "--lora", str(adapter), "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    got = [lp for lp, _ in responses(json.loads(out.read_text()), "tiny_mc")]
    merged = merged_reference(model, adapter)
    want = [
        lp for lp, _ in responses(lm.evaluate(lm.MixtralLM(merged, tok), ["tiny_mc"], include_path=task_dir), "tiny_mc")
    ]
    base = [
        lp for lp, _ in responses(lm.evaluate(lm.MixtralLM(model, tok), ["tiny_mc"], include_path=task_dir), "tiny_mc")
    ]
    assert got == pytest.approx(want, abs=1e-3)
    assert max(abs(g - b) for g, b in zip(got, base, strict=True)) > 0.05  # the adapter changes the scores
