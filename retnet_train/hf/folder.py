"""The Hugging Face files of an export folder (`python -m retnet_train.export CKPT OUT --hf`).

Beside the export's model.safetensors (which transformers reads as it is: the modeling code names
its modules as the network does) go config.json with an auto_map, generation_config.json, the
modeling code (retnet_train/hf/remote/*.py and the flat copy of retnet_train.model, bundle.py) and,
when the run had a tokenizer, tokenizer_config.json over its tokenizer.model. Needs neither
transformers nor sentencepiece to write; loading needs transformers, torch and sentencepiece only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .bundle import bundle_sources

REMOTE_DIR = Path(__file__).resolve().parent / "remote"
MODEL_CLASS = "RetNetTrainForCausalLM"
MODELING = "modeling_retnet_train.py"
BUNDLE_MARKER = "# BUNDLED FILES"


def _config_json(cfg, special_ids: dict[str, int]) -> dict:
    net = dataclasses.asdict(cfg)
    return {
        "model_type": "retnet_train",
        "architectures": [MODEL_CLASS],
        "auto_map": {"AutoConfig": "configuration_retnet_train.RetNetTrainConfig",
                     "AutoModelForCausalLM": f"modeling_retnet_train.{MODEL_CLASS}"},
        "retnet_train_config": net,
        "tie_word_embeddings": False,  # lm_head.weight is stored even when tied (see retnet_train.export)
        "use_cache": True,
        "dtype": "float32",  # the export holds fp32 master weights
        **special_ids,
    }


def _special_ids(tokenizer: Path | None) -> dict[str, int]:
    if tokenizer is None:
        return {}
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: v for k, v in ids.items() if v >= 0}


def hf_files(cfg, tokenizer: Path | None) -> dict[str, str]:
    """File name -> text of every Hugging Face file for a model of `cfg` (a ModelConfig) whose
    tokenizer, if any, is the folder's tokenizer.model (`tokenizer`: its path, read for its ids)."""
    ids = _special_ids(tokenizer)
    files = {"config.json": json.dumps(_config_json(cfg, ids), indent=2) + "\n",
             "generation_config.json": json.dumps(ids, indent=2) + "\n"}
    bundle, imports = bundle_sources()
    for src in sorted(REMOTE_DIR.glob("*.py")):
        if src.name != "__init__.py" and (tokenizer is not None or not src.name.startswith("tokenization_")):
            files[src.name] = src.read_text()
    if BUNDLE_MARKER not in files[MODELING]:
        raise ValueError(f"{REMOTE_DIR / MODELING} lost its line {BUNDLE_MARKER!r}: the bundled files' imports go there")
    files[MODELING] = files[MODELING].replace(BUNDLE_MARKER, imports + BUNDLE_MARKER, 1)
    files.update(bundle)
    if tokenizer is not None:
        files["tokenizer_config.json"] = json.dumps({
            "tokenizer_class": "RetNetTrainTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_retnet_train.RetNetTrainTokenizer", None]},
            "add_bos_token": True,  # as training and retnet_train.generate encode: [bos] + text
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }, indent=2) + "\n"
    return files
