"""`python -m retnet_train [key=value ...]`: compose conf/config.yaml with overrides and train.

Works under every launcher: plain python (one process), `torchrun --nproc_per_node N -m
retnet_train`, and `deepspeed --num_gpus N --module retnet_train` (whose `--local_rank=K` argument
is taken off the command line before Hydra's override parser sees it).
Options: --config-dir DIR, --config-name NAME, --cfg (print the composed config and exit), --debug
(an error prints its traceback, not only its one line; the traceback is always in
run_dir/logs/rankNNNNN.log), --help.

Exit status: 0 done or stopped by a signal with a checkpoint saved; 2 bad input (config, data,
checkpoint); 3 too many non-finite steps in a row; 1 any other error.
"""

from __future__ import annotations

import os
import sys


def split_argv(argv: list[str]) -> tuple[dict, list[str]]:
    """Separate launcher/CLI options from Hydra overrides."""
    opts: dict = {"config_dir": None, "config_name": "config", "print_cfg": False, "help": False, "debug": False}
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--local_rank") or a.startswith("--local-rank"):
            if "=" in a:
                value = a.split("=", 1)[1]
            else:
                i += 1
                value = argv[i]
            os.environ.setdefault("LOCAL_RANK", value)
        elif a in ("--config-dir", "--config-name", "-cd", "-cn"):
            i += 1
            opts["config_dir" if a in ("--config-dir", "-cd") else "config_name"] = argv[i]
        elif a.startswith(("--config-dir=", "--config-name=")):
            key, value = a[2:].split("=", 1)
            opts[key.replace("-", "_")] = value
        elif a in ("--cfg", "--cfg=job", "-c"):
            opts["print_cfg"] = True
            if i + 1 < len(argv) and argv[i + 1] in ("job", "all"):
                i += 1
        elif a in ("-h", "--help"):
            opts["help"] = True
        elif a == "--debug":
            opts["debug"] = True
        else:
            overrides.append(a)
        i += 1
    return opts, overrides


def main(argv: list[str] | None = None) -> int:
    opts, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    if opts["help"]:
        print(__doc__)
        print("Groups with files in conf/: model data deepspeed experiment. Every key, its default and its "
              "meaning: docs/config.md.")
        return 0
    from retnet_train.config import ConfigError, load_config

    try:
        cfg = load_config(overrides, config_dir=opts["config_dir"], config_name=opts["config_name"])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if opts["print_cfg"]:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    from retnet_train.train import train

    try:
        return train(cfg)
    except KeyboardInterrupt:  # Ctrl-C before the trainer's own handler was in place: nothing to save yet
        print("interrupted during start-up; nothing was trained", file=sys.stderr)
        return 130
    except Exception as e:  # one line on the console; the traceback goes to the rank's log file
        return report_error(e, cfg.run_dir, opts["debug"])


def report_error(e: Exception, run_dir: str, debug: bool) -> int:
    """Print `error: <message>` (once: errors every rank raised alike are printed by rank 0 only),
    append the traceback to the rank's log file, and return the exit status."""
    import traceback

    from retnet_train.config import ConfigError
    from retnet_train.data import DataError
    from retnet_train.train import TooManyBadSteps
    from retnet_train.train.checkpoint import CheckpointError
    from retnet_train.train.trainer import log_file

    rank = int(os.environ.get("RANK", "0"))
    tb = "".join(traceback.format_exception(e))
    where = log_file(run_dir, rank)
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        with open(where, "a") as f:
            f.write(tb)
    except OSError:
        where = None
    ours = isinstance(e, (ConfigError, DataError, CheckpointError, TooManyBadSteps, FileNotFoundError))
    if rank == 0 or not getattr(e, "every_rank", False):
        prefix = f"[rank{rank}] " if rank else ""
        message = str(e) if ours else f"{type(e).__name__}: {e}"
        hint = "" if debug or where is None else f" (traceback: {where}; --debug prints it here)"
        print(f"{prefix}error: {message}{hint}", file=sys.stderr)
        if debug:
            print(tb, file=sys.stderr)
    if isinstance(e, TooManyBadSteps):
        return 3
    return 2 if ours else 1


def exit_without_teardown(code: int) -> None:
    """End the process as a normal exit does, less the interpreter's teardown. That teardown ends in a
    full garbage collection over every object torch, dynamo and inductor created at import: 1-1.5 s of
    CPU in every process (each rank of every run, each `--cfg`), seen with gdb in Py_FinalizeEx.
    Non-daemon threads are joined and exit handlers run (logging's flush, wandb, multiprocessing's
    loader workers) as at a normal exit; skipped are the freeing of memory and the finalizers of
    objects still alive, which Python does not promise to run at exit either."""
    import atexit
    import threading

    threading._shutdown()  # what Py_FinalizeEx does first: wait for the non-daemon threads
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
