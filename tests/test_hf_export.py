"""export --hf: a trained checkpoint loads with transformers' Auto classes where retnet_train is
not importable, and computes what our model computes (logits, greedy generation, tokenization)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train_utils import REPO, env, run_train

pytest.importorskip("transformers", reason="the hf extra (pip install -e '.[hf]') is not installed")

TEXTS = ["def fib(n):\n    return fib(n - 1) + fib(n - 2)", "  The quick brown fox, 12345 \u00fcn\u00efc\u00f8d\u00e9 \t x\n"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from test_export import _data_root

    return _data_root(tmp_path_factory.mktemp("hf_data"))


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize("preset,extra", [("retnet_tiny", ["model.tie_embeddings=true", "model.chunk_size=8"]),
                                          ("transformer_tiny", [])])
def test_hf_folder_loads_without_retnet_train_and_equals_ours(tmp_path, data_root, preset, extra):
    import sentencepiece as spm

    from retnet_train.generate import generate
    from retnet_train.model import build_model

    run = tmp_path / "run"
    run_train(run, f"model={preset}", *extra, "trainer.data_source=stream", "data=pile_c4_stack",
              f"data.root={data_root}", "data.num_workers=0", "trainer.max_steps=3", "deepspeed=zero0",
              "trainer.eval_at_end=false")
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "retnet_train.export", str(run), str(out), "--hf"], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # transformers, in a process where retnet_train cannot be imported, from another directory
    result = tmp_path / "hf_result.pt"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "hf_load_check.py"), str(out), str(result), *TEXTS],
                          cwd=tmp_path, env=env(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    hf = torch.load(result)
    assert hf["model_module"].endswith("modeling_retnet_train")

    sp = spm.SentencePieceProcessor(model_file=str(data_root / "tokenizer.model"))
    assert hf["ids"] == [[sp.bos_id()] + sp.encode(t) for t in TEXTS]  # as training and generate encode
    assert hf["decoded"] == TEXTS

    model = build_model(out).eval()
    assert model.config.arch == preset.split("_")[0]
    prompt = torch.tensor([hf["ids"][0]])
    with torch.no_grad():
        ours = model(prompt)
    torch.testing.assert_close(hf["logits"], ours, rtol=0, atol=1e-5)
    # greedy: our reference decoder (chunkwise / KV-cache prefill, then one token per step)
    want = generate(model, prompt, 16, eos_id=sp.eos_id())[0].tolist()
    assert _until_eos(hf["generated"][0].tolist(), sp.eos_id()) == _until_eos(want, sp.eos_id())


def test_bundled_model_code_imports_only_its_own_files():
    """Every relative import of the flat copy names a bundled file, and no file imports
    retnet_train itself: the folder's code is closed."""
    from retnet_train.hf.bundle import bundle_sources

    files, _ = bundle_sources()
    for name, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, (name, node.module)
                targets = [node.module] if node.module else [a.name for a in node.names]
                for target in targets:
                    assert f"{target}.py" in files, (name, target)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(m.split(".")[0] == "retnet_train" for m in modules), (name, modules)
    assert {"rtm_retnet.py", "rtm_transformer.py", "rtm_bundle.py"} <= set(files)
    assert Path(REPO / "retnet_train/hf/remote/modeling_retnet_train.py").is_file()


@pytest.fixture(scope="module")
def hf_transformer_folder(tmp_path_factory):
    """An export --hf folder of a randomly initialised Transformer (no tokenizer), built in process."""
    from retnet_train.export import write_export
    from retnet_train.model import build_model

    torch.manual_seed(0)
    model = build_model("transformer_tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=2)
    return write_export(model.state_dict(), model.config, tmp_path_factory.mktemp("hf") / "tiny", hf=True), model


def test_hf_cache_continues_labels_and_padding(hf_transformer_folder, tmp_path, monkeypatch):
    """A cache returned by a prompt continues it as the whole sequence would; labels give the
    shifted cross-entropy; a padded batch is refused, naming why; a batch of equal-length prompts
    decodes as our generate does."""
    from transformers import AutoModelForCausalLM

    from retnet_train.generate import generate

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    folder, ours = hf_transformer_folder
    ours.eval()
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = hf(ids).logits
        first = hf(ids[:, :8], use_cache=True)
        cache = first.cache if "cache" in first else first.past_key_values
        rest = hf(ids[:, 8:9], **{"cache" if "cache" in first else "past_key_values": cache}, use_cache=True)
        torch.testing.assert_close(rest.logits[:, 0], whole[:, 8], rtol=0, atol=1e-5)
        loss = hf(ids, labels=ids).loss
        want = torch.nn.functional.cross_entropy(whole[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        torch.testing.assert_close(loss, want)
        with pytest.raises(ValueError, match="padded batches are not supported"):
            hf(ids, attention_mask=torch.tensor([[0] + [1] * 11, [1] * 12]))
        got = hf.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    assert got[:, 12:].tolist() == generate(ours, ids, 6).tolist()
