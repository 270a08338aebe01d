"""Building blocks of the config schemas: documented fields and checked choices.

Every field of a schema is declared with `doc(default, "what it means")`, so its documentation is
data (`dataclasses.fields(...)[i].metadata["doc"]`): docs/config.md is generated from it
(`python -m retnet_train.config_docs`) and a test fails on a field without one. A key that takes
one of a few words is a `Choice` (a str Enum): OmegaConf checks the value against it when YAML or
the command line sets it, and the rest of the code compares it with plain strings.

No torch here: retnet_train.data imports this in data_prep's encoding workers. The model package
keeps its own copy of these few lines (retnet_train/model/config.py), because an export's Hugging
Face folder bundles that package alone.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from typing import Any, Optional

try:
    from enum import StrEnum
except ImportError:  # Python 3.10: the same behaviour for what we use (str() and format() give the value)
    class StrEnum(str, enum.Enum):
        def __str__(self) -> str:
            return str(self.value)


class Choice(StrEnum):
    """One of a fixed set of words. Members are named as their values, because OmegaConf looks a
    YAML or command-line string up by member name (and writes the name when it saves a config).
    A member equals, hashes and formats as its string; its repr is the string's too, so messages
    read `trainer.precision='bf16'` as they did before the choices were Enums."""

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


def doc(default: Any, text: str, *, shown_type: Optional[str] = None) -> Any:
    """A dataclass field with its documentation. A mutable default (list, dict, a dataclass
    instance) becomes a factory of copies. shown_type: the type as docs/config.md should show it,
    for a field whose annotation is looser than what it accepts (Any)."""
    metadata = {"doc": text}
    if shown_type:
        metadata["type"] = shown_type
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
