"""Generation: recurrent decoding after a chunkwise prefill equals re-running the parallel form."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from retnet_train.generate import generate, parse_args, read_prompt_file
from test_train_utils import REPO, env, run_train


def _model():
    from retnet_train.model import build_model

    torch.manual_seed(0)
    return build_model("retnet_tiny", d_model=64, n_layers=2, n_heads=2, vocab_size=256).eval()


def test_greedy_decoding_matches_parallel_forward():
    model = _model()
    prompt = torch.randint(0, 256, (2, 37))  # not a multiple of the chunk size
    new = generate(model, prompt, max_new_tokens=12, temperature=0.0, chunk_size=16)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, seq[:, 37:])


def test_bad_generate_key_names_it():
    try:
        parse_args(["checkpoint=x", "max_new_token=3"])
    except ValueError as e:
        assert "max_new_token" in str(e)
    else:
        raise AssertionError("no error")


@pytest.mark.parametrize("prompt", ["def fib(n):", "def ", "true", "0123", "", "a=b: 'c' \"d\" ", "[1, 2]"])
def test_prompt_is_taken_literally(prompt):
    cfg = parse_args(["checkpoint=x", f"prompt={prompt}", "max_new_tokens=5", "temperature=0"])
    assert cfg.prompt == prompt
    assert cfg.max_new_tokens == 5 and cfg.temperature == 0.0  # other keys still typed


def test_prompt_and_prompt_file_together_name_both():
    with pytest.raises(ValueError, match="prompt='hi'.*prompt_file='p.txt'"):
        parse_args(["checkpoint=x", "prompt=hi", "prompt_file=p.txt"])


def test_prompt_file_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("  indented\n\nwith space \r\n\ttab\f feed\n\n".encode())
    assert read_prompt_file(str(path)) == ["  indented", "with space ", "\ttab\f feed"]
    path.write_bytes(b"\xff\n")
    with pytest.raises(ValueError, match="prompt_file=.*UTF-8"):
        read_prompt_file(str(path))


def test_padding_ids_decode_to_nothing():
    """Ids of the model's padded vocabulary rows (past the tokenizer's pieces) print as nothing."""
    import sentencepiece as spm

    from retnet_train.generate import _text_of

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(_tiny_tokenizer_proto())
    ids = sp.encode("abc")
    assert _text_of("x", ids + [sp.get_piece_size(), sp.get_piece_size() + 5], sp) == "x" + sp.decode(ids)


def _tiny_tokenizer_proto() -> bytes:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["abc abd bca cab"] * 50), model_writer=model,
                                   vocab_size=12, model_type="char", minloglevel=2)
    return model.getvalue()


def test_generate_cli_from_a_run_dir(tmp_path):
    run_train(tmp_path, "trainer.max_steps=2", "deepspeed=zero0", "trainer.eval_at_end=false")
    proc = subprocess.run([sys.executable, "-m", "retnet_train.generate", f"checkpoint={tmp_path}",
                           "prompt_ids=[1,2,3]", "max_new_tokens=5", "seed=1"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = [int(x) for x in proc.stdout.split()]
    # what the last checkpoint's weights (read here from DeepSpeed's own file) sample from the same
    # seed with the command's default sampling settings (temperature 0.8, top-k 50, top-p 0.95)
    from retnet_train.model import build_model

    ckpt = tmp_path / "checkpoints" / "step_00000002"
    weights = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    model = build_model("retnet_tiny", d_model=64, n_layers=2, n_heads=2, vocab_size=256)
    model.load_state_dict(weights)
    defaults = parse_args(["checkpoint=x"])
    want = generate(model, torch.tensor([[1, 2, 3]]), 5, defaults.temperature, defaults.top_k, defaults.top_p,
                    seed=1)
    assert ids == want[0].tolist()


@pytest.mark.parametrize("arg,message", [
    ("chunk_size=-4", "chunk_size=-4 must be >= 1"),
    ("chunk_size=0", "chunk_size=0 must be >= 1"),
    ("tokenizer=/nonexistent/t.model", "tokenizer='/nonexistent/t.model': no such file"),
    ("device=gpu", "device='gpu' must be auto, cpu, cuda or cuda:N"),
])
def test_bad_values_are_named_before_the_model_loads(arg, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_args(["checkpoint=x", arg])


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5])
def test_sampling_refuses_a_temperature_that_is_not_a_finite_number_at_least_zero(temperature):
    from retnet_train.inference.sampling import SamplingSettings

    with pytest.raises(ValueError, match=f"temperature={temperature} must be a finite number >= 0"):
        SamplingSettings(1, torch.device("cpu")).set(temperature, 0, 1.0, 0)
