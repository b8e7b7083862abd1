"""Imports flow one way: decisions and storage below, I/O and orchestration above.

Checked by parsing each module's imports, so a shortcut that would tie the layers together (the
store reaching for a sync rule, the Action Network client for a sync module) fails here first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "csand"


def csand_imports(module: str) -> set[str]:
    path = PACKAGE / (module.removeprefix("csand.").replace(".", "/") + ".py")
    if not path.exists():  # a package: its __init__
        path = path.with_suffix("") / "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("csand"):
            names.add(node.module if node.module != "csand" else
                      ",".join(f"csand.{a.name}" for a in node.names))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("csand"))
    return {n for name in names for n in name.split(",")}


ALLOWED = {
    # module: the csand modules it may import
    "csand.model": set(),
    "csand.retry": set(),
    "csand.actionnetwork.errors": set(),
    "csand.sync.rules": {"csand.model"},
    "csand.storage": {"csand.model", "csand.storage.sqlite", "csand.storage.postgres",
                      "csand.storage.bulk"},
    "csand.storage.common": {"csand.model"},
    "csand.storage.bulk": {"csand.storage.common"},
    "csand.storage.sqlite": {"csand.model", "csand.logs", "csand.storage",
                             "csand.storage.common", "csand.storage.bulk"},
    "csand.storage.postgres": {"csand.model", "csand.logs", "csand.storage",
                               "csand.storage.common", "csand.storage.bulk"},
    "csand.storage.copy": {"csand.storage", "csand.storage.common", "csand.storage.sqlite"},
    "csand.controlshift.versions": {"csand.model"},
    "csand.controlshift.ingest": {"csand.controlshift.bulk", "csand.model", "csand.logs",
                                  "csand.metrics", "csand.retry", "csand.storage",
                                  "csand.storage.bulk"},
    "csand.actionnetwork.client": {"csand.actionnetwork.errors", "csand.model", "csand.logs",
                                   "csand.ratelimit", "csand.metrics"},
}


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_imports_flow_one_way(module: str) -> None:
    assert csand_imports(module) <= ALLOWED[module]


def test_nothing_below_the_worker_imports_a_sync_module() -> None:
    for module in ("csand.storage", "csand.storage.sqlite", "csand.actionnetwork.client",
                   "csand.actionnetwork.errors", "csand.model", "csand.retry", "csand.ratelimit"):
        assert not any(name.startswith("csand.sync") for name in csand_imports(module)), module


def test_storage_imports_nothing_above_it() -> None:
    for module in ("csand.storage", "csand.storage.sqlite"):
        above = ("csand.sync", "csand.controlshift", "csand.actionnetwork", "csand.daemon",
                 "csand.cli", "csand.config")
        assert not any(name.startswith(above) for name in csand_imports(module)), module
