"""The paper-scale experiments read the production mixture, not the sample data."""

import pytest

from retnet_train.config import load_config


@pytest.mark.parametrize("name", ["retnet_1.3b", "retnet_1.3b_1gpu", "retnet_2.7b", "retnet_6.7b", "retnet_13b",
                                  "retnet_1.3b_32k",
                                  "retnet_1.3b_256k_cp2",
                                  "transformer_1.3b"])
def test_large_experiments_use_pile_c4_stack(name, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")  # retnet_13b's tp=4 and the cp=2 recipe's 16 sequences per step divide it
    cfg = load_config([f"experiment={name}", "data.root=/corpora"])
    assert sorted(cfg.data.sources) == ["c4", "pile", "stack"]
    assert cfg.data.sources.pile.path.startswith("/corpora/")
