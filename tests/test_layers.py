"""Imports only go down the floors of docs/architecture.md: core < api < (training | metrics),
and the gateway and the client (services.client) on api and core alone. A test, so an arrow
the wrong way fails at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "services.core": ("services.core",),
    "services.api": ("services.api", "services.core"),
    "services.training": ("services.training", "services.api", "services.core"),
    "services.metrics": ("services.metrics", "services.api", "services.core"),
    "gateway": ("gateway", "services.api", "services.core"),
    "services.client": ("services.client", "services.api", "services.core"),
}


def package_of(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:2]) if parts[0] == "services" else parts[0]


def our_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.split(".")[0] in ("services", "gateway")}


SOURCES = sorted(
    path
    for folder in ("services", "gateway")
    for path in (REPO / folder).rglob("*.py")
    if "oneseek" not in path.relative_to(REPO).parts  # generated code
    and package_of(path) in MAY_IMPORT
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_go_down_the_floors(path: Path) -> None:
    allowed = MAY_IMPORT[package_of(path)]
    wrong = sorted(
        name
        for name in our_imports(path)
        if not any(name == floor or name.startswith(floor + ".") for floor in allowed)
    )
    assert wrong == [], f"{path.relative_to(REPO)} imports {wrong}; it may import {allowed}"


def test_every_package_is_checked() -> None:
    assert {package_of(path) for path in SOURCES} == set(MAY_IMPORT)


def test_the_local_executor_never_imports_ray() -> None:
    """A training service and its worker on the default executor import nothing of Ray, even
    with Ray installed (it is an optional extra)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import services.training.server, services.training.worker, services.cli\n"
        "from services.training.executors import ExecutorSettings\n"
        "ExecutorSettings().create()\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]", out.stdout
