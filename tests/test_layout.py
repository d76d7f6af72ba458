"""Package layout rules: imports run one way, learner -> actors -> protos, and
the math module stays free of Ray."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imports_run_one_way():
    forbidden = {"protos": {"actors", "learner"}, "actors": {"learner"}}
    for package, banned in forbidden.items():
        for f in (ROOT / package).rglob("*.py"):
            bad = imported_packages(f) & banned
            assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_core_algos_is_pure_torch():
    assert imported_packages(ROOT / "learner" / "core_algos.py") <= {"__future__", "typing", "torch"}
