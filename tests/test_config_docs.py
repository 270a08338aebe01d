"""One typed, documented config: every key has its doc, docs/config.md is generated from the
schemas and current, choices are Enums that OmegaConf checks (plain strings still work)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from retnet_train.config import ConfigError, checkpointing_mode, conf_dir, load_config
from retnet_train.config_docs import COMMAND, PAGE, missing_docs, render
from retnet_train.schema import doc

SYN = ["trainer.data_source=synthetic"]


def test_every_key_and_schema_is_documented():
    assert missing_docs() == [], "\n".join(missing_docs())


@dataclasses.dataclass
class Inner:
    """A section."""

    ok: int = doc(1, "documented")
    bare: int = 2


@dataclasses.dataclass
class Root:
    inner: Inner = doc(Inner(), "the section")


def test_an_undocumented_key_is_found():
    found = missing_docs(Root)
    assert found == ["(root): Root has no docstring", "inner.bare: no doc (declare it with doc(default, text))"]


def test_config_page_is_current():
    assert PAGE.read_text() == render(), f"docs/config.md is stale: run `{COMMAND}`"


def test_choices_from_the_command_line():
    cfg = load_config([*SYN, "trainer.precision=bf16_autocast", "model.norm=rmsnorm"])
    # an Enum member that is its string: comparisons, formatting and a saved config read as before
    assert cfg.trainer.precision == "bf16_autocast" and f"{cfg.model.norm}" == "rmsnorm"
    from omegaconf import OmegaConf

    assert "precision: bf16_autocast" in OmegaConf.to_yaml(cfg)
    with pytest.raises(ConfigError, match=r"trainer.precision='bf17': must be one of \['auto', 'bf16', "):
        load_config([*SYN, "trainer.precision=bf17"])
    with pytest.raises(ConfigError, match=r"model.head_norm='batchnorm': must be one of \['groupnorm', 'rmsnorm'\]"):
        load_config([*SYN, "model.head_norm=batchnorm"])


def test_choices_from_a_yaml_file(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    (conf / "experiment" / "ok.yaml").write_text("# @package _global_\ntrainer:\n  mode: chunkwise\n"
                                                 "logging:\n  wandb:\n    mode: disabled\n")
    cfg = load_config([*SYN, "experiment=ok"], config_dir=str(conf))
    assert (cfg.trainer.mode, cfg.logging.wandb.mode) == ("chunkwise", "disabled")
    (conf / "experiment" / "bad.yaml").write_text("# @package _global_\nlogging:\n  wandb:\n    mode: loud\n")
    with pytest.raises(ConfigError, match=r"logging.wandb.mode='loud': must be one of \['online', 'offline', "):
        load_config([*SYN, "experiment=bad"], config_dir=str(conf))


def test_activation_checkpointing_takes_the_old_booleans():
    assert load_config([*SYN, "trainer.activation_checkpointing=true"]).trainer.activation_checkpointing is True
    assert (checkpointing_mode(True), checkpointing_mode(False), checkpointing_mode("selective")) == \
        ("full", "none", "selective")
    with pytest.raises(ConfigError, match="trainer.activation_checkpointing='some': must be one of"):
        load_config([*SYN, "trainer.activation_checkpointing=some"])
    with pytest.raises(ConfigError, match="trainer.checkpoint_layers=99: more than model.n_layers="):
        load_config([*SYN, "trainer.activation_checkpointing=full", "trainer.checkpoint_layers=99"])


def test_model_choices_take_plain_strings():
    from retnet_train.model import ModelConfig, ModelConfigError, resolve_config
    from retnet_train.model.config import Norm

    cfg = resolve_config({"norm": "rmsnorm", "d_model": 64, "n_heads": 2})
    assert cfg.norm is Norm.rmsnorm and cfg.norm == "rmsnorm"
    assert ModelConfig(arch="transformer").arch == "transformer"
    with pytest.raises(ModelConfigError, match=r"model.ffn_type='swiglu' is not one of \['gelu', 'glu'\]"):
        resolve_config("retnet_tiny", ffn_type="swiglu")


@pytest.mark.parametrize("name", sorted(p.stem for p in (conf_dir() / "deepspeed").glob("*.yaml")))
def test_zero_files_hold_only_what_differs(name):
    """One file per stage: its stage and (zero3_offload) the offload switches; the rest is the schema's."""
    import yaml

    values = yaml.safe_load((conf_dir() / "deepspeed" / f"{name}.yaml").read_text())
    assert set(values) <= {"stage", "offload_optimizer", "offload_params"}, values
    assert values["stage"] == int(name[len("zero")])
    cfg = load_config([*SYN, f"deepspeed={name}"])
    assert cfg.deepspeed.stage == values["stage"]
    assert cfg.deepspeed.offload_params == values.get("offload_params", False)
