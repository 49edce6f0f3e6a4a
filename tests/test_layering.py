"""Imports run one way (../shared/STYLE.md, rule 10): config, rng -> diffusion/, models/,
data/ -> pipeline/ -> inference/ -> evaluation/ -> training/ -> cli. A module may import
its own layer or a lower one, never a higher one (function-level imports included)."""
from __future__ import annotations

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "ipu_diffusion")
LAYERS = [("_keras", "config", "configs", "quiet", "rng", "progress"), ("diffusion", "models", "data", "visualize"),
          ("pipeline",), ("inference",), ("evaluation",), ("training",), ("cli", "cli_parser", "__main__")]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str:
    return module.split(".")[1] if module.startswith("ipu_diffusion.") else ""


def _imports(path: str):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ipu_diffusion":
                yield from (a.name for a in node.names)
            else:
                yield _top(node.module)
        elif isinstance(node, ast.Import):
            yield from (_top(a.name) for a in node.names)


def test_imports_run_one_way():
    bad = []
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, PACKAGE)
            own = rel.split(os.sep)[0].replace(".py", "")
            if own == "__init__":
                continue
            for target in _imports(path):
                if target in RANK and RANK[target] > RANK[own]:
                    bad.append(f"{rel} imports ipu_diffusion.{target}")
    assert not bad, "\n".join(sorted(set(bad)))
