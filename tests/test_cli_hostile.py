"""Bad and awkward input to the `mixtral` command: one clear line and a non-zero status, never a traceback or a
silent wrong answer; and the rough edges users hit (counts, dtypes, tokenizers, separators, progress, threads)."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import mixtral
import mixtral.cli
from mixtral import cli_args

README = Path(__file__).resolve().parents[1] / "README.md"


def cli(*args: str) -> int:
    """`mixtral ARGS` in-process: its exit status (argparse's errors exit through SystemExit)."""
    try:
        return mixtral.cli.main(list(args))
    except SystemExit as e:
        return e.code


def refused(capsys, *args: str) -> str:
    """The command fails with status 2 and one error line (the last on stderr), no traceback; returns that line."""
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "tiny"
    assert mixtral.cli.main(["init", "--preset", "tiny", "--out", str(path), "--seed", "3"]) == 0
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 20)
    return path


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---- 13: flag values that ran, crashed or were ignored -------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "0"])
def test_eval_batch_size_must_be_positive(capsys, ckpt, text, value):
    line = refused(capsys, "eval", "--checkpoint", str(ckpt), "--text", str(text), "--batch-size", value)
    assert f"--batch-size: {value} is invalid: must be >= 1" in line


def test_eval_seq_len_must_be_positive_and_fit_the_context(capsys, ckpt, text):
    line = refused(capsys, "eval", "--checkpoint", str(ckpt), "--text", str(text), "--seq-len", "0")
    assert "--seq-len: 0 is invalid: must be >= 1" in line
    line = refused(capsys, "eval", "--checkpoint", str(ckpt), "--text", str(text), "--seq-len", "1000")
    assert "--seq-len 1000 is more than the model's context of 512 tokens" in line


def test_eval_names_its_input_text_not_training_data(capsys, ckpt, tmp_path):
    line = refused(capsys, "eval", "--checkpoint", str(ckpt), "--text", str(tmp_path / "none.txt"))
    assert f"--text {tmp_path / 'none.txt'} does not exist" in line and "training" not in line
    line = refused(capsys, "eval", "--checkpoint", str(ckpt), "--text", str(tmp_path / "*.md"))
    assert "--text pattern" in line and "matches no files" in line and "training" not in line


def test_prefill_chunk_must_be_positive(capsys, ckpt):
    line = refused(capsys, "generate", "--checkpoint", str(ckpt), "--prompt", "Hi", "--prefill-chunk", "0")
    assert "--prefill-chunk: 0 is invalid: must be >= 1" in line


def test_routing_max_tokens_must_be_positive(capsys, ckpt, text, tmp_path):
    args = ["routing", "--checkpoint", str(ckpt), "--text", str(text), "--out", str(tmp_path / "r")]
    line = refused(capsys, *args, "--max-tokens", "0")
    assert "--max-tokens: 0 is invalid: must be >= 1" in line


def test_an_empty_prompt_is_refused(capsys, ckpt, monkeypatch):
    line = refused(capsys, "generate", "--checkpoint", str(ckpt), "--prompt", "", "--max-new-tokens", "2")
    assert "--prompt is empty" in line
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    line = refused(capsys, "generate", "--checkpoint", str(ckpt), "--prompt", "-", "--max-new-tokens", "2")
    assert "read from stdin (--prompt -) is empty" in line


# ---- 14: rough edges -------------------------------------------------------------------------------------------


def test_info_on_an_int4_checkpoint_says_int4_and_counts_in_millions(capsys, tmp_path):
    from mixtral.checkpoint import save_quantized
    from mixtral.quantize import quantize_model

    config = dataclasses.replace(mixtral.get_preset("tiny"), n_kv_heads=4)  # wk, wv: 64 rows, as int4 needs
    torch.manual_seed(0)
    model = mixtral.Transformer(config).to(torch.bfloat16)
    save_quantized(quantize_model(model, "int4", group_size=32), tmp_path / "q4")
    assert cli("info", "--checkpoint", str(tmp_path / "q4")) == 0
    out = capsys.readouterr().out
    assert "stored as int4 (weight-only quantized, groups of 32; router, norms and embedding in bfloat16)" in out
    total, active = config.param_counts()
    assert f"parameters   {total / 1e6:.1f}M total, {active / 1e6:.1f}M active per token" in out
    assert cli("info", "--checkpoint", str(tmp_path / "q4"), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantization"]["mode"] == "int4" and info["quantization"]["group_size"] == 32
    assert info["layout"] == "quantized"
    assert cli("info") == 0  # the built-in model: 21.4M, not "0.021B"
    assert "parameters   21.4M total, 12.0M active per token" in capsys.readouterr().out


def test_merge_lora_keeps_the_base_dtype_and_writes_its_tokenizer(tmp_path, capsys):
    from safetensors import safe_open

    from mixtral.train.lora import apply_lora, save_adapter

    model = mixtral.load_model(mixtral.BUILTIN, dtype=torch.float32)
    apply_lora(model, rank=2, alpha=4.0, targets=("wq",))
    save_adapter(model, tmp_path / "adapter")
    del model
    out = tmp_path / "merged"
    assert cli("merge-lora", "--base", "builtin", "--adapter", str(tmp_path / "adapter"), "--out", str(out)) == 0
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert 40e6 < size < 46e6  # bfloat16 as the built-in model is stored, not float32's 86 MB
    with safe_open(next(out.glob("*.safetensors")), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 - safe_open is no dict == {"BF16"}
    assert mixtral.load_tokenizer(out).encode("Hello") == mixtral.load_tokenizer().encode("Hello")


def test_train_init_from_builtin_and_from_gguf_writes_a_real_tokenizer(tmp_path, corpus, ckpt, capsys):
    # a GGUF file as the starting point: its tokenizer (from its metadata) is written as a tokenizer.model,
    # not the .gguf file copied under that name
    gguf = tmp_path / "tiny.gguf"
    assert cli("export", "--checkpoint", str(ckpt), "--type", "f32", "--out", str(gguf)) == 0
    common = ["--data", str(corpus / "doc00.txt"), str(corpus / "doc01.txt"), "--eval-fraction", "0.5"]
    common += ["--seq-len", "16", "--batch-size", "1", "--steps", "1", "--data-cache", "", "--threads", "1"]
    assert cli("train", "--init-from", str(gguf), "--out-dir", str(tmp_path / "g"), *common) == 0
    written = (tmp_path / "g" / "model" / "tokenizer.model").read_bytes()
    assert not written.startswith(b"GGUF")
    tok = mixtral.load_tokenizer(tmp_path / "g" / "model")
    assert tok.encode("the king said") == mixtral.load_tokenizer(gguf).encode("the king said")
    # the built-in model by name
    assert cli("train", "--init-from", "builtin", "--out-dir", str(tmp_path / "b"), "--lora-rank", "2", *common) == 0
    assert (tmp_path / "b" / "adapter").is_dir()


def test_piped_chat_separates_the_turns(ckpt, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nHow are you?\n"))
    assert cli("chat", "--checkpoint", str(ckpt), "--max-new-tokens", "3") == 0
    out = capsys.readouterr().out
    first, second = out.index("> Hello there\n"), out.index("> How are you?\n")
    assert first == 0 and second > first + len("> Hello there\n")


def test_an_unknown_flag_shows_the_commands_usage(capsys):
    for command, args in (("generate", ["--prompt", "x"]), ("eval", ["--text", "x"])):
        assert cli(command, *args, "--bogus") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"usage: mixtral {command} ")
        assert err.strip().splitlines()[-1] == f"mixtral {command}: error: unrecognized arguments: --bogus"


def test_max_new_tokens_beyond_the_context_names_the_flag_not_prompt_0(capsys, ckpt):
    line = refused(capsys, "generate", "--checkpoint", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "100000")
    assert "prompt 0" not in line and "--max-new-tokens is 100000" in line
    assert "more than the model's context of 512 tokens" in line and "at most" in line


def test_readme_python_example_runs_and_streams_text(tmp_path, monkeypatch, capsys):
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # our own README's example
    out = capsys.readouterr().out
    printed = scope["tok"].decode(scope["new"][0]) + "\n"
    assert out.startswith(printed)
    streamed = out[len(printed) :]
    assert streamed.strip(), "generate_stream printed nothing"
    assert all(s not in streamed for s in scope["params"].stop)
    assert (tmp_path / "out" / "config.json").is_file()


def test_eval_and_routing_show_progress_on_stderr(capsys, ckpt, text, tmp_path):
    assert cli("eval", "--checkpoint", str(ckpt), "--text", str(text), "--seq-len", "32", "--threads", "1") == 0
    captured = capsys.readouterr()
    assert "eval:" in captured.err and "batch" in captured.err and "loss" in captured.out
    args = ["routing", "--checkpoint", str(ckpt), "--text", str(text), "--out", str(tmp_path / "r"), "--threads", "1"]
    assert cli(*args) == 0
    assert "routing:" in capsys.readouterr().err


def test_routing_heat_map_is_not_cut_at_the_edges(tmp_path):
    import matplotlib.image

    from mixtral.routing import plot_shares

    E, L = 8, 4
    share = [[1.0 / E] * E for _ in range(L)]  # [L, E] for the one source
    plot_shares({"share_by_source": {"a.txt": share}, "tokens": {"a.txt": 100}}, tmp_path / "p.png")
    png = matplotlib.image.imread(tmp_path / "p.png")[..., :3]
    # nothing drawn in the outermost pixels: the colour bar's label (the widest thing on the right) fits
    for edge in (png[:, -2:], png[:2, :], png[-2:, :], png[:, :2]):
        assert edge.min() > 0.99


# ---- 15: --threads ---------------------------------------------------------------------------------------------


def cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return root


@pytest.mark.parametrize(
    ("affinity", "files", "expected"),
    [
        (8, {}, 8),  # no cgroup files: the affinity
        (8, {"cpu.max": "max 100000\n"}, 8),  # v2, no quota
        (8, {"cpu.max": "300000 100000\n"}, 3),  # v2: 3 CPUs
        (2, {"cpu.max": "400000 100000\n"}, 2),  # taskset to 2 of a 4-CPU quota
        (8, {"cpu.max": "150000 100000\n"}, 1),  # 1.5 CPUs: rounded down
        (8, {"cpu.max": "20000 100000\n"}, 1),  # a fifth of a CPU: still one thread
        (8, {"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),  # v1
        (8, {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 8),  # v1, none
    ],
)
def test_default_threads_count_the_cores_this_process_may_use(tmp_path, monkeypatch, affinity, files, expected):
    monkeypatch.setattr(cli_args.os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(cli_args, "CGROUP", cgroup(tmp_path, files))
    assert cli_args.available_cpus() == expected


COMMANDS_THAT_RUN_THE_MODEL = {
    "generate": ["--prompt", "x"],
    "chat": [],
    "eval": ["--text", "x"],
    "routing": ["--text", "x"],
    "train": ["--data", "x"],
    "serve": [],
    "bench": [],
}


@pytest.mark.parametrize("command", list(COMMANDS_THAT_RUN_THE_MODEL))
@pytest.mark.parametrize("value", ["0", "-3", "abc"])
def test_threads_flag_is_checked_on_every_command(capsys, command, value):
    line = refused(capsys, command, *COMMANDS_THAT_RUN_THE_MODEL[command], "--threads", value)
    assert line.startswith(f"mixtral {command}: error: argument --threads:") and ">= 1" in line


def test_threads_flag_and_its_default_set_torchs_threads(ckpt, monkeypatch, capsys, keep_threads):
    args = ["generate", "--checkpoint", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "1"]
    torch.set_num_threads(2)
    assert cli(*args, "--threads", "1") == 0 and torch.get_num_threads() == 1
    monkeypatch.setattr(cli_args, "available_cpus", lambda: 2)
    assert cli(*args) == 0 and torch.get_num_threads() == 2
    # serve and bench share the flag (and so its check and default)
    parser = mixtral.cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in COMMANDS_THAT_RUN_THE_MODEL:
        flag = next(a for a in commands[name]._actions if "--threads" in a.option_strings)
        assert flag.type is cli_args.positive_int, name
