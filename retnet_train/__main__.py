"""`python -m retnet_train [key=value ...]`: compose conf/config.yaml with overrides and train.

Works under every launcher: plain python (one process), `torchrun --nproc_per_node N -m
retnet_train`, and `deepspeed --num_gpus N --module retnet_train` (whose `--local_rank=K` argument
is taken off the command line before Hydra's override parser sees it).
Options: --config-dir DIR, --config-name NAME, --cfg (print the composed config and exit), --help.
"""

from __future__ import annotations

import os
import sys


def split_argv(argv: list[str]) -> tuple[dict, list[str]]:
    """Separate launcher/CLI options from Hydra overrides."""
    opts: dict = {"config_dir": None, "config_name": "config", "print_cfg": False, "help": False}
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
        else:
            overrides.append(a)
        i += 1
    return opts, overrides


def main(argv: list[str] | None = None) -> int:
    opts, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    if opts["help"]:
        print(__doc__)
        print("Groups: model data optim deepspeed parallel trainer checkpoint logging experiment (see conf/).")
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
    from retnet_train.train import TooManyBadSteps, train

    try:
        return train(cfg)
    except TooManyBadSteps as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
