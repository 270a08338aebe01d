"""docs/config.md, generated from the config schemas: every key, its type, default and meaning.

    python -m retnet_train.config_docs            # write docs/config.md
    python -m retnet_train.config_docs --check    # exit 1 if docs/config.md is not what this writes

The text comes from the schemas' `doc(...)` fields and class docstrings (retnet_train/config.py,
retnet_train/model/config.py, retnet_train/data/config.py) and from the first comment of each file
in conf/; nothing is written by hand. tests/test_config_docs.py fails when a field has no doc or
the page is stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import MISSING

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "config.md"
COMMAND = "python -m retnet_train.config_docs"

INTRO = """\
`python -m retnet_train [key=value ...]` composes the config from, in order: the defaults below
(the schemas), conf/config.yaml's choice of one file per group (`model: retnet_tiny`,
`data: sample`, `deepspeed: zero2`; each file sets only what differs from the schema), an
optional `experiment=<name>` (a whole recipe, conf/experiment/), and the command line
(`trainer.max_steps=100`, `deepspeed=zero3`). `python -m retnet_train --cfg job [overrides]`
prints the result. An unknown key, a wrong type or a value outside a key's choices stops the run
at start-up with a message naming the key and the value; so do impossible combinations (see
docs/training.md)."""


# ---- walking the schemas -------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return args[0], True
    return tp, False


def _is_schema(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _dict_value(tp: Any) -> Any:
    """The value type of a dict[str, X] annotation, else None."""
    if typing.get_origin(tp) in (dict, typing.Dict) and len(typing.get_args(tp)) == 2:
        return typing.get_args(tp)[1]
    return None


def sections(root: Optional[type] = None) -> list[tuple[str, type]]:
    """(key prefix, schema) of every schema reachable from the root, depth first: "" for the root,
    "logging.wandb", "data.sources.<name>" for the values of a dict of schemas."""
    from retnet_train.config import _make_root_schema

    out: list[tuple[str, type]] = []

    def walk(prefix: str, schema: type) -> None:
        out.append((prefix, schema))
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            tp, _ = _unwrap_optional(hints[f.name])
            key = f"{prefix}.{f.name}" if prefix else f.name
            if _is_schema(tp):
                walk(key, tp)
            elif _is_schema(_dict_value(tp)):
                walk(f"{key}.<name>", _dict_value(tp))

    walk("", root or _make_root_schema())
    return out


def fields(schema: type) -> Iterator[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        yield f, hints[f.name]


def missing_docs(root: Optional[type] = None) -> list[str]:
    """Keys without documentation, and schemas without a docstring of their own."""
    out = []
    for prefix, schema in sections(root):
        if not _own_docstring(schema):
            out.append(f"{prefix or '(root)'}: {schema.__name__} has no docstring")
        for f, _ in fields(schema):
            if not str(f.metadata.get("doc", "")).strip():
                out.append(f"{prefix + '.' if prefix else ''}{f.name}: no doc (declare it with doc(default, text))")
    return out


def _own_docstring(schema: type) -> str:
    text = schema.__doc__ or ""
    # @dataclass writes "Name(field: type, ...)" where a class has no docstring
    return "" if text.startswith(f"{schema.__name__}(") else inspect.cleandoc(text)


# ---- rendering -----------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _anchor(prefix: str) -> str:
    return "root" if not prefix else prefix.replace(".", "").replace("<", "").replace(">", "").lower()


def _type(f: dataclasses.Field, tp: Any, key: str) -> str:
    if "type" in f.metadata:
        return _cell(f.metadata["type"])
    tp, optional = _unwrap_optional(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        text = " \\| ".join(f"`{m.value}`" for m in tp)
    elif _is_schema(tp):
        text = f"[section](#{_anchor(key)})"
    elif _is_schema(_dict_value(tp)):
        text = f"name: [section](#{_anchor(key + '.<name>')})"
    elif _dict_value(tp) is not None:
        text = "dict"
    elif typing.get_origin(tp) in (list, typing.List):
        (item,) = typing.get_args(tp)
        text = f"list of {getattr(item, '__name__', str(item))}"
    elif tp is Any:
        text = "any"
    else:
        text = getattr(tp, "__name__", str(tp))
    return f"{text} or `null`" if optional else text


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(below)"
    if value == MISSING:
        return "required"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{_cell(json.dumps(value))}`"  # null, true/false, numbers, [..], {..} as YAML reads them


def _section(prefix: str, schema: type) -> list[str]:
    title = f"`{prefix}`" if prefix else "root"
    # the root schema is made by make_dataclass, whose module differs between Python versions
    module = "retnet_train.config" if not prefix else schema.__module__
    source = f"`{schema.__name__}` in {module.replace('.', '/')}.py"
    lines = [f'<a id="{_anchor(prefix)}"></a>', f"## {title}", "", f"Schema: {source}.", "",
             _own_docstring(schema), "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    for f, tp in fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        lines.append(f"| `{key}` | {_type(f, tp, key)} | {_default(f)} | {_cell(f.metadata.get('doc', ''))} |")
    return lines + [""]


def _file_comment(path: Path) -> str:
    """The first sentence of the comment at the top of a YAML file (Hydra's `# @package` line left
    out): what the file is; the file itself says more."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            words.append(line.lstrip("#").strip())
    text = " ".join(w for w in words if w)
    return re.split(r"(?<=\.)\s+(?=[A-Z0-9`])", text, maxsplit=1)[0]


def _files(group_dir: Path) -> list[str]:
    files = sorted(group_dir.glob("*.yaml"))
    if not files:
        return []
    rel = group_dir.relative_to(group_dir.parents[1]).as_posix()
    lines = [f"Files of `{rel}/`, chosen with `{group_dir.name}=<file>`:", "", "| file | what it is |", "|---|---|"]
    lines += [f"| `{p.stem}` | {_cell(_file_comment(p))} |" for p in files]
    return lines + [""]


def render(conf: Optional[Path] = None) -> str:
    from retnet_train.config import conf_dir

    conf = Path(conf or conf_dir())
    parts = ["# Configuration reference", "",
             f"<!-- Generated by `{COMMAND}` from the config schemas and conf/; do not edit. A key's text is",
             "its `doc(...)` in the schema; tests/test_config_docs.py fails when this page is stale. -->", "",
             INTRO, ""]
    found = sections()
    parts += [f"- [{('`' + p + '`') if p else 'root'}](#{_anchor(p)})" for p, _ in found]
    parts += ["- [experiments](#experiment)", ""]
    for prefix, schema in found:
        parts += _section(prefix, schema)
        if prefix and "." not in prefix and (conf / prefix).is_dir():
            parts += _files(conf / prefix)
    parts += ['<a id="experiment"></a>', "## experiments", "",
              "A whole recipe: `experiment=<name>` sets keys of any section (and picks group files).", ""]
    parts += _files(conf / "experiment")
    return "\n".join(parts).rstrip() + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the page differs from what would be written")
    p.add_argument("--out", type=Path, default=PAGE)
    args = p.parse_args(argv)
    missing = missing_docs()
    if missing:
        print("undocumented config keys:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
