"""TokenStream throughput in tokens/s per loader worker, and its memory.

    python bench/stream_throughput.py [--config conf/data/sample.yaml] [--no-append]

Reads the sample shards (`make sample-data`).  num_workers=0 is the rate of one worker's
work done in the measuring process; with workers, the rate seen by the trainer (includes the
hand-over of batches between processes).  Memory: peak RSS of the measuring process and of
the loader workers (ru_maxrss of the reaped children).
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from retnet_train.data import DataConfig, TokenStream

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.results import append  # noqa: E402  (the project's RESULTS.md format)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024


def run(cfg: DataConfig, seq_len: int, b: int, seconds: float) -> tuple[float, float, float]:
    before = rss_mb()
    s = TokenStream(cfg, seq_len=seq_len, micro_batch_size=b, dp_rank=0, dp_size=8)
    it = iter(s)
    for _ in range(20):  # warm up: workers started, first shards open
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["input_ids"].numel()
    rate = n / (time.perf_counter() - t0)
    grew = rss_mb() - before
    del it, s
    gc.collect()
    time.sleep(0.5)  # let the workers exit so that their peak RSS is counted
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return rate, grew, workers


def load_data_config(p: argparse.ArgumentParser, path: str) -> DataConfig:
    """--config is a file's path, not a name as the trainer's data=sample: name a bad one in one
    line (argparse's error, exit 2) with the data configs there are, instead of a traceback."""
    there = ", ".join(str(f.relative_to(REPO)) for f in sorted((REPO / "conf" / "data").glob("*.yaml")))
    if not Path(path).is_file():
        p.error(f"--config {path}: not a file; give a data config's path, such as one of {there}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path)))
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        p.error(f"--config {path}: not a data config ({reason}); give a data config's path, such as one of {there}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="conf/data/sample.yaml",
                   help="the data config's YAML file (a path: conf/data/sample.yaml, not sample)")
    p.add_argument("--seq-lens", default="256,512,2048")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--no-append", action="store_true", help="print only, do not touch RESULTS.md")
    a = p.parse_args()
    base = load_data_config(p, a.config)
    rows = []
    for seq in map(int, a.seq_lens.split(",")):
        for w in map(int, a.workers.split(",")):
            base.num_workers = w
            rate, grew, peak_workers = run(base, seq, a.batch, a.seconds)
            per = rate / max(w, 1)
            rows.append([seq, a.batch, w or "0 (in-process)", f"{rate / 1e6:.1f}M",
                         f"{per / 1e6:.1f}M", f"{grew:+.0f} MB", f"{peak_workers:.0f} MB" if w else "-"])
            print(rows[-1], flush=True)
    header = ["seq_len", "micro-batch", "loader workers", "tokens/s", "tokens/s per worker",
              "RSS growth, trainer process", "peak RSS of a worker"]
    notes = (f"{a.config}: sample shards (window 256, uint16), mixture 0.5/0.3/0.2, rank 0 of "
             f"dp 8, {a.seconds:g} s per row after 20 warm-up batches; the machine is shared")
    append("TokenStream throughput", header, rows, notes, save=not a.no_append)


if __name__ == "__main__":
    main()
