"""`python -m retnet_train.generate` with text prompts, through the real CLI: prompt= is taken
literally, prompt_file= generates every line in turn, and conflicting or bad keys exit 2."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from data_fixtures import code, texts_for
from test_train_utils import REPO, env, run_train

SEPARATOR = "-" * 40 + "\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """A small sentencepiece model trained with the project's settings on prose and code."""
    from data_prep.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    words = ["fib", "self", "value", "total", "item", "return", "class", "print"]
    docs = texts_for(60) + [code(rng, words, i) for i in range(60)]
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = root / "tok.model"
    train_tokenizer(str(out), 400, {"text": [str(corpus)]}, threads=1)
    return str(out)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    # vocab 512 covers the tokenizer's 400 pieces
    run = tmp_path_factory.mktemp("run")
    run_train(run, "model.vocab_size=512", "trainer.max_steps=2", "deepspeed=zero0", "trainer.eval_at_end=false")
    return str(run)


def _generate(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retnet_train.generate", *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout)


def _outputs(checkpoint: str, tokenizer: str, *args: str) -> list[str]:
    """The texts printed, one per prompt and sample (separator lines removed)."""
    proc = _generate(f"checkpoint={checkpoint}", f"tokenizer={tokenizer}", "max_new_tokens=6", "seed=3", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if SEPARATOR not in proc.stdout:
        return [proc.stdout]
    parts = proc.stdout.split(SEPARATOR)
    assert parts[-1] == "", proc.stdout  # a separator after every output
    return parts[:-1]


@pytest.mark.parametrize("prompt", ["def fib(n):", "def ", "true", "0123", "", "x = {'a': \"b\"}  "])
def test_prompt_is_printed_byte_for_byte(checkpoint, tokenizer, prompt):
    """No new tokens: the output is the prompt exactly as given (YAML would have parsed these)."""
    proc = _generate(f"checkpoint={checkpoint}", f"tokenizer={tokenizer}", f"prompt={prompt}", "max_new_tokens=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == prompt + "\n"


@pytest.mark.parametrize("prompt", ["def fib(n):", "def ", "true"])
def test_generated_text_starts_with_the_prompt(checkpoint, tokenizer, prompt):
    [text] = _outputs(checkpoint, tokenizer, f"prompt={prompt}")
    assert text.startswith(prompt), (prompt, text)
    assert len(text) > len(prompt) + 1  # something was generated after it


def test_prompt_file_generates_each_line(checkpoint, tokenizer, tmp_path):
    """Two prompts (CRLF line ends, an empty line between, a trailing space kept): two outputs,
    each what prompt= alone gives for that line."""
    path = tmp_path / "prompts.txt"
    path.write_bytes("def fib(n):\r\n\r\nclass A: \n".encode())
    got = _outputs(checkpoint, tokenizer, f"prompt_file={path}")
    assert len(got) == 2, got
    assert got[0].startswith("def fib(n):") and got[1].startswith("class A: "), got
    assert got == [*_outputs(checkpoint, tokenizer, "prompt=def fib(n):"),
                   *_outputs(checkpoint, tokenizer, "prompt=class A: ")]


def test_prompt_file_with_num_samples(checkpoint, tokenizer, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("one\ntwo\n", encoding="utf-8")
    got = _outputs(checkpoint, tokenizer, f"prompt_file={path}", "num_samples=2")
    assert [t[:3] for t in got] == ["one", "one", "two", "two"], got


def test_prompt_and_prompt_file_together_exit_2_naming_both(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n", encoding="utf-8")
    proc = _generate(f"checkpoint={tmp_path}", "prompt=def ", f"prompt_file={path}")
    assert proc.returncode == 2, proc.stderr
    assert "prompt='def '" in proc.stderr and f"prompt_file='{path}'" in proc.stderr, proc.stderr


@pytest.mark.parametrize("content", [None, b"", b"\n\r\n\n"], ids=["missing", "empty", "empty-lines"])
def test_bad_prompt_file_exits_2_naming_it(tmp_path, content):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    proc = _generate(f"checkpoint={tmp_path}", f"prompt_file={path}")
    assert proc.returncode == 2, proc.stderr
    assert f"prompt_file='{path}'" in proc.stderr, proc.stderr


def test_other_keys_keep_their_errors(tmp_path):
    proc = _generate(f"checkpoint={tmp_path}", "prompt=x", "max_new_tokens=many")
    assert proc.returncode == 2 and "max_new_tokens" in proc.stderr, proc.stderr


def test_batch_size_does_not_change_the_samples(checkpoint, tokenizer, tmp_path):
    """Sample j of a prompt draws from (seed, j) in any batch: batch_size 1 and 4 print the same,
    and the decoding speed goes to stderr."""
    path = tmp_path / "prompts.txt"
    path.write_text("def fib(n):\nclass A:\nreturn\n", encoding="utf-8")
    one = _outputs(checkpoint, tokenizer, f"prompt_file={path}", "num_samples=2", "batch_size=1")
    four = _outputs(checkpoint, tokenizer, f"prompt_file={path}", "num_samples=2", "batch_size=4")
    assert one == four and len(one) == 6
    # the state written back once every 3 tokens decodes the same samples
    assert _outputs(checkpoint, tokenizer, f"prompt_file={path}", "num_samples=2", "state_window=3") == one
    bad = _generate(f"checkpoint={checkpoint}", "prompt=x", "state_window=0")
    assert bad.returncode == 2 and "state_window=0 must be >= 1" in bad.stderr, bad.stderr
    proc = _generate(f"checkpoint={checkpoint}", f"tokenizer={tokenizer}", "prompt=def ", "max_new_tokens=4")
    assert proc.returncode == 0 and "tokens/s" in proc.stderr and "tokens/s" not in proc.stdout, proc.stderr
