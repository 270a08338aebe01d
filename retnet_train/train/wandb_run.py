"""wandb on rank 0: offline without an API key, the same run id after a restart, or disabled."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class WandbRun:
    def __init__(self, run):
        self.run = run

    def log(self, record: dict) -> None:
        step = record.get("step")
        data = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float, bool))}
        self.run.log(data, step=step)

    def finish(self) -> None:
        self.run.finish()


def start_wandb(wcfg, run_name: str, run_dir: str | Path, config: dict) -> WandbRun | None:
    mode = str(wcfg.mode)  # the plain word for wandb, not our Choice Enum
    if mode == "disabled":
        return None
    if mode == "online" and not _has_api_key():
        log.warning("logging.wandb.mode=online but no WANDB_API_KEY or netrc login: logging offline "
                    "(sync later with `wandb sync %s/wandb/offline-run-*`)", run_dir)
        mode = "offline"
    import wandb

    run_dir = Path(run_dir)
    id_file = run_dir / "wandb_id.txt"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)
        id_file.write_text(run_id)
    run = wandb.init(project=wcfg.project, entity=wcfg.entity, name=wcfg.name or run_name, group=wcfg.group,
                     tags=list(wcfg.tags), config=config, dir=str(run_dir), id=run_id, resume="allow",
                     mode=mode, settings=wandb.Settings(silent=True, console="off"))
    return WandbRun(run)
