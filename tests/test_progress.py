"""retnet_train.progress: every item comes through; off a terminal, plain lines and no carriage returns."""

import subprocess
import sys
import textwrap

from retnet_train.progress import Bar, phase, track


def test_track_yields_every_item_in_order():
    assert list(track(iter(range(1000)), "items", total=1000, every=0)) == list(range(1000))
    assert list(track([], "nothing")) == []


def test_disabled_bar_prints_nothing(capsys):
    with Bar("quiet", total=3, enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_piped_output_has_plain_lines_and_no_carriage_returns():
    code = textwrap.dedent("""
        from retnet_train.progress import Bar, phase, track
        for _ in track(range(50), "items", every=0):
            pass
        with Bar("bytes", total=3_000_000, unit="B", every=0) as bar:
            bar.note("7 docs")
            bar.set(1_500_000)
            bar.set(3_000_000)
        with phase("one long call"):
            pass
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-1].startswith("one long call: done in")
    assert any(ln.startswith("items: 50/50 it") and "done in" in ln for ln in lines)
    assert any(ln.startswith("bytes: 1.5MB/3.0MB, 50%") and "7 docs" in ln for ln in lines)


def test_terminal_gets_a_tqdm_bar():
    class Tty:
        def __init__(self):
            self.text = ""

        def isatty(self):
            return True

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    out = Tty()
    with Bar("tty", total=4, stream=out) as bar:
        bar.update(4)
    assert bar._tqdm is not None and "4/4" in out.text
    with phase("quiet", enabled=False):
        pass
