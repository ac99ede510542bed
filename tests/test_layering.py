"""The layers: common/ is the ground floor and imports nothing from edge/ or cloud/; the edge and the
cloud know nothing of each other (they share protocol and sampling through common/). Every import
statement counts, lazy ones inside functions included."""
import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import statement in a file; relative imports are skipped."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(package: str, forbidden: set[str]) -> list[str]:
    files = sorted((Path(ROOT) / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return [f"{f.relative_to(ROOT)}:{line} imports {pkg}"
            for f in files for line, pkg in imported_packages(f) if pkg in forbidden]


@pytest.mark.parametrize("package, forbidden", [
    ("common", {"edge", "cloud"}),
    ("edge", {"cloud"}),
    ("cloud", {"edge"}),
])
def test_layers_do_not_import_upwards_or_sideways(package, forbidden):
    assert violations(package, forbidden) == []


def test_the_check_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    from edge.node import EdgeNode\n    import cloud.server as s\n")
    assert [pkg for _, pkg in imported_packages(f)] == ["os", "edge", "cloud"]
