"""The real `mixtral` console script on a tiny checkpoint."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mixtral
import mixtral.cli
from mixtral.generate import generate_stream
from mixtral.kernels import cpu as cpu_kernels
from mixtral.sampling import SamplingParams
from mixtral.tokenizer import load_tokenizer

MIXTRAL = str(Path(sys.executable).parent / "mixtral")


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([MIXTRAL, *args], input=stdin, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    out = run("init", "--preset", "tiny", "--out", str(path), "--seed", "3")
    assert out.returncode == 0, out.stderr
    return path


def library_text(path, ids, max_new_tokens):
    model = mixtral.load_model(path)
    tok = load_tokenizer()
    events = generate_stream(model, [ids], SamplingParams(max_new_tokens=max_new_tokens), tokenizer=tok)
    return "".join(ev.text for ev in events)


def test_generate_streams_the_library_output(ckpt):
    out = run("generate", "--checkpoint", str(ckpt), "--prompt", "The capital of France is", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    tok = load_tokenizer()
    expected = library_text(ckpt, tok.encode("The capital of France is"), 12)
    assert out.stdout == expected + "\n"
    n_prompt = len(tok.encode("The capital of France is"))
    assert f"prompt: {n_prompt} tokens" in out.stderr and "tokens/s" in out.stderr


def test_the_kernels_are_ready_before_the_prompt_is_timed(ckpt, monkeypatch, capsys):
    # A first run builds the CPU kernels (a minute or more): that must happen before the timing starts, not
    # inside the first forward pass, where it would count as the prompt's time.
    calls = []
    monkeypatch.setattr(cpu_kernels, "ops", lambda: calls.append("kernels"))
    real = mixtral.cli.generate_stream
    monkeypatch.setattr(mixtral.cli, "generate_stream", lambda *a, **kw: calls.append("timed") or real(*a, **kw))
    assert mixtral.cli.main(["generate", "--checkpoint", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert "timed" in calls and calls[0] == "kernels"
    assert "tokens/s" in capsys.readouterr().err


def test_generate_with_sampling_flags_is_reproducible(ckpt):
    args = ["generate", "--checkpoint", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "10"]
    args += ["--temperature", "0.9", "--top-p", "0.9", "--seed", "5", "--dtype", "bfloat16"]
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout


def test_chat_with_piped_input(ckpt):
    out = run("chat", "--checkpoint", str(ckpt), "--max-new-tokens", "6", stdin="Hello there\n\nHow are you?\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")  # each message echoed as on a terminal, then its answer
    assert lines[0] == "> Hello there" and lines[2] == "> How are you?"
    answers = [lines[1], lines[3]]
    tok = load_tokenizer()
    first = library_text(ckpt, tok.encode_chat([{"role": "user", "content": "Hello there"}]), 6)
    assert answers[0] == first
    convo = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "How are you?"},
    ]
    assert answers[1] == library_text(ckpt, tok.encode_chat(convo), 6)


def test_info(ckpt):
    out = run("info", "--checkpoint", str(ckpt), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    model = mixtral.load_model(ckpt)
    assert info["parameters_total"] == sum(p.numel() for p in model.parameters())
    assert info["dtype"] == "float32" and info["layout"] == "Hugging Face"
    assert info["size_on_disk_bytes"] == (ckpt / "model.safetensors").stat().st_size
    text = run("info", "--checkpoint", str(ckpt)).stdout
    assert "active per token" in text and "n_experts" in text


def test_too_long_prompt_is_a_clear_error(ckpt):
    out = run("generate", "--checkpoint", str(ckpt), "--prompt", "word " * 600, "--max-new-tokens", "10")
    assert out.returncode == 2
    assert "more than the model's context of 512 tokens" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_checkpoint_and_flags_are_clear_errors(tmp_path, ckpt):
    out = run("generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = run("generate", "--checkpoint", str(ckpt), "--prompt", "x", "--top-p", "0")
    assert out.returncode == 2 and "top_p=0.0 is invalid" in out.stderr
    out = run("generate", "--checkpoint", str(ckpt), "--prompt", "x", "--device", "cuda:7")
    if not torch.cuda.is_available():
        assert out.returncode == 2 and "CUDA is not available" in out.stderr


def test_quantize_writes_what_quantizing_after_loading_gives(ckpt, tmp_path, capsys):
    from mixtral.quantize import quantize_model

    assert (
        mixtral.cli.main(["quantize", "--checkpoint", str(ckpt), "--mode", "int8", "--out", str(tmp_path / "q")]) == 0
    )
    got, want = (
        mixtral.load_model(tmp_path / "q").state_dict(),
        quantize_model(mixtral.load_model(ckpt), "int8").state_dict(),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # the tiny preset's wk has 32 output rows: no int4 blocks of 64, and a one-line error saying so
    assert (
        mixtral.cli.main(["quantize", "--checkpoint", str(ckpt), "--mode", "int4", "--out", str(tmp_path / "q4")]) == 2
    )
    assert "divisible by 64" in capsys.readouterr().err and not (tmp_path / "q4").exists()


def test_generate_with_quantize_flag_is_the_library_on_the_quantized_model(ckpt):
    from mixtral.quantize import quantize_model

    out = run("generate", "--checkpoint", str(ckpt), "--quantize", "int8", "--prompt", "Hello", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    tok = load_tokenizer()
    model = quantize_model(mixtral.load_model(ckpt), "int8")
    events = generate_stream(model, [tok.encode("Hello")], SamplingParams(max_new_tokens=8), tokenizer=tok)
    assert out.stdout == "".join(ev.text for ev in events) + "\n"
    out = run("generate", "--checkpoint", str(ckpt), "--quantize", "int8", "--prompt", "x", "--device", "meta")
    assert out.returncode == 2 and "the meta device holds no numbers" in out.stderr


@pytest.mark.parametrize(
    "command",
    ["generate", "chat", "info", "init", "routing", "serve", "train", "merge-lora", "eval", "quantize", "bench"],
)
def test_help_explains_every_flag(command):
    out = run(command, "--help")
    assert out.returncode == 0
    parser = mixtral.cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"
            assert action.option_strings[0] in out.stdout


def test_ctrl_c_stops_the_answer_not_the_chat(ckpt):
    """On a terminal, Ctrl-C during an answer stops that answer; the chat goes on to the next message."""
    import os
    import pty
    import select
    import signal
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat on a pseudo-terminal
        os.execv(MIXTRAL, [MIXTRAL, "chat", "--checkpoint", str(ckpt), "--max-new-tokens", "490",
                           "--temperature", "1", "--seed", "0"])  # fmt: skip
    output = b""

    def read_until(marker: bytes, timeout: float = 120, after: int = 0) -> None:
        nonlocal output
        deadline = time.time() + timeout
        while marker not in output[after:] and time.time() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    output += os.read(fd, 4096)
                except OSError:
                    break
        assert marker in output[after:], output[-500:]

    try:
        read_until(b"> ")
        for _ in range(5):  # a test process stalled longer than the whole answer (a busy machine) asks again
            os.write(fd, b"Tell me a long story\n")
            start = len(output)
            deadline = time.time() + 60
            while len(output) < start + 40 and time.time() < deadline:  # the answer has begun streaming
                if select.select([fd], [], [], 0.05)[0]:
                    output += os.read(fd, 4096)
            while select.select([fd], [], [], 0)[0]:  # all it has written so far
                output += os.read(fd, 4096)
            if b"\r\n> " not in output[start:]:  # still answering
                break
        os.kill(pid, signal.SIGINT)
        read_until(b"[interrupted]")
        at = output.index(b"[interrupted]")
        read_until(b"> ", timeout=60, after=at)  # back at the prompt: the program is still running
        os.write(fd, b"\x04")  # Ctrl-D quits
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.close(fd)


def test_chat_drops_the_oldest_exchanges_to_fit_the_context(ckpt):
    # context 512: two exchanges of ~15 + 200 tokens fit, the third needs the first one dropped
    out = run("chat", "--checkpoint", str(ckpt), "--max-new-tokens", "200", stdin="one\ntwo\nthree\n")
    assert out.returncode == 0, out.stderr
    assert "dropped the 2 oldest messages to fit the context of 512" in out.stderr
    too_long = run("chat", "--checkpoint", str(ckpt), "--max-new-tokens", "5", stdin="word " * 600 + "\nhi\n")
    assert too_long.returncode == 0
    assert "more than the context of 512" in too_long.stderr
    assert len(too_long.stdout.strip()) > 0  # the next message was answered


def test_out_never_replaces_what_is_not_ours_without_force(tmp_path, ckpt):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    a_file = tmp_path / "a.txt"
    a_file.write_text("mine")
    adapter = str(tmp_path / "no-adapter")  # refused before anything is loaded
    commands = [
        (["init", "--out", str(notes)], notes, "todo.txt"),
        (["init", "--out", str(a_file)], a_file, "a file"),
        (["quantize", "--checkpoint", str(ckpt), "--mode", "int8", "--out", str(a_file)], a_file, "a file"),
        (["merge-lora", "--base", str(ckpt), "--adapter", adapter, "--out", str(notes)], notes, "todo.txt"),
    ]
    for args, path, what in commands:
        out = run(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert f"{path} is" in out.stderr and what in out.stderr and "--force" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    assert (notes / "todo.txt").read_text() == "mine" and a_file.read_text() == "mine"
    # a previous output of ours is replaced; --force replaces anything
    out = run("init", "--out", str(tmp_path / "model"))
    assert out.returncode == 0, out.stderr
    out = run("init", "--out", str(tmp_path / "model"), "--seed", "1")
    assert out.returncode == 0, out.stderr
    out = run("init", "--out", str(notes), "--force")
    assert out.returncode == 0, out.stderr
    assert not (notes / "todo.txt").exists() and mixtral.load_model(notes).config.n_layers > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "model", "notes"]
