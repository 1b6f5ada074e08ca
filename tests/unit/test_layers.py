"""The packages are layers, and no import runs upward: errors < ops < store < workers < core < api < cli.

errors   the typed error tree (every layer may raise these)
ops      settings, metrics, logs, the request record (observation)
store    state that outlives a process: the database, its schema and migrations
workers  the vLLM workers: pool, health, transport, contract, supervisor, discovery, prepare
core     what a request becomes: protocol, templates, few-shot, caps, gateway, relay, context
api      the HTTP edge: endpoint table, dispatcher, middlewares, handlers, OpenAPI, server
"""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"
LAYERS = ["errors", "ops", "store", "workers", "core", "api", "cli"]


def layer_of(module: str) -> int:
    """The layer of a module named `service.<part>...` (the package itself is the bottom)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else 0


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("service"))
    return found


def test_no_import_runs_upward() -> None:
    upward = []
    for path in sorted(SERVICE.rglob("*.py")):
        module = "service." + ".".join(path.relative_to(SERVICE).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        for imported in imports_of(path):
            if layer_of(imported) > layer_of(module):
                upward.append(f"{module} -> {imported}")
    assert not upward, "\n".join(upward)


def test_every_module_is_in_a_layer() -> None:
    loose = [p.name for p in SERVICE.glob("*.py") if p.stem not in {"__init__", "errors", "cli"}]
    assert not loose, loose
