"""The model code of a Hugging Face folder: our own retnet_train.model modules, copied flat.

transformers runs a folder's code from its module cache, into which it copies only the files that
the modeling file reaches through `from .name import ...` lines, all from the folder's top level: a
package cannot go in as it is. So each module the networks need becomes `rtm_<path>.py`
(kernels/norm_gate.py -> rtm_kernels_norm_gate.py, the package kernels/__init__.py -> rtm_kernels.py)
with its relative imports rewritten to those names. The folder runs the code training ran: one
implementation, and a folder that loads where retnet_train is not installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parents[1] / "model"
# what the folder's modeling code uses; everything these import comes along
ROOTS = ("retnet", "transformer", "config", "kernels")
PREFIX = "rtm_"
# the module the modeling code imports the networks from
INDEX = PREFIX + "bundle"


def _source(module: str) -> Path | None:
    """The file of a dotted module name relative to retnet_train.model ("kernels.norm_gate"), or None."""
    base = MODEL_DIR.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def flat_name(module: str) -> str:
    return PREFIX + module.replace(".", "_")


def _absolute(importer: str, level: int, target: str | None) -> str:
    """The module a relative import in `importer` names (dotted, relative to retnet_train.model)."""
    parts = importer.split(".") if _source(importer).name == "__init__.py" else importer.split(".")[:-1]
    if level - 1 > len(parts):
        raise ValueError(f"{importer}: a relative import of level {level} leaves retnet_train.model")
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([target] if target else []))


def _rewrite(module: str) -> tuple[str, set[str]]:
    """The flat copy of `module` and the modules it imports (its relative imports only)."""
    text = _source(module).read_text()
    lines = text.splitlines(keepends=True)
    needed: set[str] = set()
    edits = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = _absolute(module, node.level, node.module)
        indent = " " * node.col_offset
        new, names = [], []
        for alias in node.names:
            sub = f"{base}.{alias.name}" if base else alias.name
            if _source(sub) is not None:  # a module imported as a name: `from .kernels import norm_gate as x`
                needed.add(sub)
                new.append(f"{indent}from . import {flat_name(sub)} as {alias.asname or alias.name}\n")
            else:
                if _source(base) is None:
                    raise ValueError(f"{module}: `from {'.' * node.level}{node.module or ''} import {alias.name}` "
                                     f"names no module of retnet_train.model")
                needed.add(base)
                names.append(alias.name if not alias.asname else f"{alias.name} as {alias.asname}")
        if names:
            new.append(f"{indent}from .{flat_name(base)} import {', '.join(names)}\n")
        edits.append((node.lineno - 1, node.end_lineno, new))
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = new
    header = f"# retnet_train/model/{_source(module).relative_to(MODEL_DIR)}, copied by retnet_train.export --hf\n"
    return header + "".join(lines), needed


def bundle_sources() -> tuple[dict[str, str], str]:
    """(file name -> text of every flat module the folder needs, index included; the import lines
    that name each of those files, for the modeling file: see file_imports)."""
    files: dict[str, str] = {}
    todo, seen = list(ROOTS), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        text, needed = _rewrite(module)
        files[flat_name(module) + ".py"] = text
        todo.extend(needed - seen)
    files[INDEX + ".py"] = BUNDLE_INDEX
    return files, file_imports(sorted(seen) + [INDEX[len(PREFIX):]])


def file_imports(modules: list[str]) -> str:
    """One `from .x import` line per bundled file. transformers copies a folder's code files into
    its module cache by scanning the modeling file for such lines (transformers 4.x: that file's
    own lines only; 5.x follows them from file to file), so the modeling file carries one for each
    file, including those only imported as `from . import x`, which the scan does not see. The
    block never runs: the kernel modules import triton, which a machine may not have."""
    return ("if False:  # never runs: these lines name the bundled files for transformers' copy of the folder\n"
            + "".join(f"    from .{flat_name(m)} import __name__  # noqa: F401\n" for m in modules))


# the names the folder's modeling code takes from the bundle
BUNDLE_INDEX = f"""\"\"\"The bundled copy of retnet_train.model (written by retnet_train.export --hf).\"\"\"
from .{flat_name('config')} import ModelConfig, config_from_dict  # noqa: F401
from .{flat_name('kernels')} import resolve_kernels  # noqa: F401
from .{flat_name('lm')} import State  # noqa: F401
from .{flat_name('retnet')} import RetNet  # noqa: F401
from .{flat_name('transformer')} import Transformer  # noqa: F401
"""
