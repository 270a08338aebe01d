"""bench/stream_throughput.py: a --config that is not a data config's file is named in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from test_train_utils import REPO, env


def _run(config: str) -> subprocess.CompletedProcess:
    # --no-append: should the check ever let a bad value through, RESULTS.md stays as it is
    return subprocess.run([sys.executable, "bench/stream_throughput.py", "--config", config, "--no-append",
                           "--seconds", "0.1", "--seq-lens", "256", "--workers", "0"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("config, why", [
    ("sample", "not a file"),  # a name, as the trainer's data=sample, where a path is asked for
    ("conf/data", "not a file"),
    ("conf/model/retnet_tiny.yaml", "not a data config (Key 'arch' not in 'DataConfig')"),
])
def test_a_bad_config_is_named_with_the_data_configs_there_are(config, why):
    proc = _run(config)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"stream_throughput.py: error: --config {config}: {why}; give a data config's path, "
                           "such as one of conf/data/"), proc.stderr
    assert "conf/data/sample.yaml" in last.split("such as one of ")[1].split(", "), last
