"""The lm-evaluation-harness model `retnet_train`: a local two-example task of each request type
(loglikelihood, loglikelihood_rolling, generate_until) gives what our model computes on its own,
in process and through `python -m retnet_train.lm_eval`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_train_utils import REPO, env

pytest.importorskip("lm_eval", reason="the eval extra (pip install -e '.[eval]') is not installed")

DATA = REPO / "tests" / "data" / "lm_eval_tiny" / "tiny.jsonl"
TASKS = {
    "rt_tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                   "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
    "rt_tiny_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                        "metric_list": [{"metric": "word_perplexity"}]},
    "rt_tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                    "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False},
                    "metric_list": [{"metric": "exact_match"}]},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An export of a randomly initialised retnet (vocabulary of a tokenizer trained on the test
    corpus) and a folder of task yamls over tests/data/lm_eval_tiny."""
    from data_fixtures import write_corpus
    from data_prep.sources import expand_sources
    from data_prep.tokenizer import train_tokenizer
    from retnet_train.export import write_export
    from retnet_train.model import build_model

    root = tmp_path_factory.mktemp("lm_eval")
    tok = root / "tokenizer.model"
    train_tokenizer(str(tok), 400, expand_sources(write_corpus(root / "raw").specs()), threads=1)
    torch.manual_seed(0)
    model = build_model("retnet_tiny", vocab_size=512, d_model=64, n_layers=2, n_heads=2, chunk_size=8)
    export = write_export(model.state_dict(), model.config, root / "export", tok)
    tasks = root / "tasks"
    tasks.mkdir()
    for name, spec in TASKS.items():
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(DATA)}},
                "test_split": "test", **spec}
        (tasks / f"{name}.yaml").write_text(json.dumps(spec))  # JSON is YAML
    return export, tasks


def _own_loglikelihood(model, ids: list[int], n_cont: int) -> float:
    """log p of the last n_cont tokens of ids, one unpadded sequence."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])), dim=-1)[0]
    return float(logp[-n_cont:].gather(1, torch.tensor(ids[-n_cont:])[:, None]).sum())


def test_local_tasks_equal_our_model(folders, monkeypatch, tmp_path):
    import lm_eval
    import sentencepiece as spm
    from lm_eval.tasks import TaskManager

    from retnet_train.generate import generate
    from retnet_train.lm_eval_adapter import RetNetTrainLM
    from retnet_train.model import build_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    export, tasks = folders
    lm = RetNetTrainLM(checkpoint=str(export), batch_size=3, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=TaskManager(include_path=str(tasks)),
                                  log_samples=True)
    samples = out["samples"]
    model = build_model(export).eval()
    sp = spm.SentencePieceProcessor(model_file=str(export / "tokenizer.model"))
    bos = [sp.bos_id()]

    mc = [s for s in samples["rt_tiny_mc"]]
    assert len(mc) == 2
    for sample in mc:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            ctx, whole = bos + sp.encode(context), bos + sp.encode(context + continuation)
            assert whole[:len(ctx)] == ctx  # the test texts split cleanly at the context's end
            want = _own_loglikelihood(model, whole, len(whole) - len(ctx))
            assert abs(resp[0][0] - want) < 1e-4, (context, continuation, resp, want)

    assert len(samples["rt_tiny_rolling"]) == len(samples["rt_tiny_gen"]) == 2
    for sample in samples["rt_tiny_rolling"]:
        ids = bos + sp.encode(sample["doc"]["text"])
        assert abs(sample["resps"][0][0] - _own_loglikelihood(model, ids, len(ids) - 1)) < 1e-4

    for sample in samples["rt_tiny_gen"]:
        prompt = torch.tensor([bos + sp.encode(sample["arguments"][0][0])])
        new = generate(model, prompt, 6, eos_id=sp.eos_id())[0].tolist()
        new = new[: new.index(sp.eos_id())] if sp.eos_id() in new else new
        want = sp.decode([i for i in new if i < sp.get_piece_size()]).split("\n\n")[0]
        assert sample["resps"][0][0] == want
    assert set(out["results"]) >= set(TASKS)


def test_command_line_runs_a_local_task(folders, tmp_path):
    export, tasks = folders
    cmd = [sys.executable, "-m", "retnet_train.lm_eval", "--model", "retnet_train", "--model_args",
           f"checkpoint={export}", "--tasks", "rt_tiny_mc", "--include_path", str(tasks), "--batch_size", "2",
           "--device", "cpu", "--output_path", str(tmp_path / "results")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env(HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets"),
                                  PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads(p.read_text()) for p in Path(tmp_path / "results").rglob("results*.json")]
    assert results and results[0]["results"]["rt_tiny_mc"]["acc,none"] in (0.0, 0.5, 1.0)
