"""bench/results.py names the commit a figure was measured at, and says when the tree differed."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import results  # noqa: E402


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_commit_marks_a_tree_that_differs_from_head(tmp_path, monkeypatch):
    monkeypatch.delenv("RETNET_COMMIT", raising=False)
    (tmp_path / "bench").mkdir()
    tracked = tmp_path / "bench" / "kernel.py"
    tracked.write_text("x = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = git(tmp_path, "rev-parse", "--short", "HEAD")
    monkeypatch.setattr(results, "RESULTS", tmp_path / "bench" / "RESULTS.md")
    assert results.commit() == head
    tracked.write_text("x = 2\n")  # e.g. a newer tree copied over an older checkout
    assert results.commit() == head + "+changes"
    monkeypatch.setenv("RETNET_COMMIT", "abc1234")
    assert results.commit() == "abc1234"


def test_commit_outside_a_repository_is_unknown(tmp_path, monkeypatch):
    monkeypatch.delenv("RETNET_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no git")
    assert results.commit() == "unknown"
