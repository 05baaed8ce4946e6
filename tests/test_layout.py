"""The library is a stack: each subpackage imports only the rows above it (ARCHITECTURE.md).

Every import counts, at module level or inside a function, and so do module paths handed to
``importlib`` as strings: an import written inside a function cannot dodge a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "medvlm"

#: Top row first. A module may import its own subpackage and any row above its own; subpackages
#: in one row are independent of each other.
LAYERS: list[tuple[str, ...]] = [
    ("utils",),
    ("records", "config"),
    ("models",),
    ("llm",),
    ("data_curation",),
    ("eval",),
    ("diagnostics",),
    ("training",),
    ("demo",),
]
ROW = {name: i for i, row in enumerate(LAYERS) for name in row}
MODULE_PATH = re.compile(r"^medvlm\.(\w+)(?:\.\w+)*(?::\w+)?$")


def subpackage(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if parts[0] == "medvlm" and len(parts) > 1 else None


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, imported medvlm module) for every import and module-path string in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if MODULE_PATH.match(node.value):
                found.append((node.lineno, node.value.split(":")[0]))
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            head = str(node.values[0].value)
            if head.startswith("medvlm.") and head.count(".") >= 2:
                found.append((node.lineno, head.rstrip(".")))
    return [(line, mod) for line, mod in found if mod.split(".")[0] == "medvlm"]


def modules():
    return sorted(p for p in ROOT.rglob("*.py"))


def test_every_subpackage_has_a_row():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    packages |= {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    assert packages == set(ROW), f"subpackages without a row: {packages - set(ROW)}; rows without code: " \
                                 f"{set(ROW) - packages}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_go_only_up_the_stack(path):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    own = subpackage(".".join(rel.parts))
    bad = []
    for line, mod in imported(path):
        target = subpackage(mod)
        if target is None or target == own:
            continue
        if own is None:  # medvlm/__init__.py stays light: it imports no subpackage
            bad.append(f"line {line}: {mod}")
        elif target not in ROW:
            bad.append(f"line {line}: {mod} (no such subpackage)")
        elif ROW[target] >= ROW[own]:
            bad.append(f"line {line}: {mod} (row {ROW[target]} {LAYERS[ROW[target]]} is not above row {ROW[own]} "
                       f"{LAYERS[ROW[own]]})")
    assert not bad, f"{path.relative_to(ROOT.parent)} imports against the stack:\n" + "\n".join(bad)


def test_the_checker_sees_imports_inside_functions_and_module_strings(tmp_path):
    code = ('import os\n\ndef f():\n    from medvlm.training.stage import run_stage\n'
            '    return importlib.import_module("medvlm.demo.base")\n'
            'X = f"medvlm.eval.{name}"\n')
    (tmp_path / "m.py").write_text(code)
    assert sorted(m for _, m in imported(tmp_path / "m.py")) == ["medvlm.demo.base", "medvlm.eval", "medvlm.training.stage"]
