"""Package layout rules (README, "Code layout"): imports run one way, learner -> actors
-> protos; inside ``actors`` only ``runtime/`` knows Ray; the math stays pure torch;
every module says what it holds; no god-files."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("actors", "learner", "protos")
RAY_FREE = ["actors/rollout", "actors/reward", "actors/tasks", "actors/weights", "actors/models", "actors/data",
            "actors/envs", "actors/types.py", "actors/device.py", "actors/validation.py", "actors/serving.py"]
"""Plain workers and their building blocks: no ``ray``, no ``actors.runtime`` (lazy imports included)."""
RAY_IN_LEARNER = ["learner/driver", "learner/actor.py", "learner/control/registry.py", "learner/cli.py"]
"""Where the learner package may use Ray: the driver, the learner's actor factory, the reward-model
registry (it starts actors) and the CLI (``ray.init``)."""


def modules(*paths: str) -> list[Path]:
    out = []
    for p in paths:
        path = ROOT / p
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return [f for f in out if not f.name.endswith(("_pb2.py", "_pb2_grpc.py"))]


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module ``path`` imports, at any depth (function-level too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def tops(path: Path) -> set[str]:
    return {n.split(".")[0] for n in imported_modules(path)}


def test_imports_run_one_way():
    forbidden = {"protos": {"actors", "learner"}, "actors": {"learner"}}
    for package, banned in forbidden.items():
        for f in modules(package):
            bad = tops(f) & banned
            assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", RAY_FREE)
def test_workers_and_their_parts_know_no_ray(path):
    for f in modules(path):
        names = imported_modules(f)
        bad = {n for n in names if n == "ray" or n.startswith(("ray.", "actors.runtime"))}
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}: Ray belongs in actors/runtime"


def test_ray_in_learner_only_where_the_layout_says():
    allowed = {f for f in modules(*RAY_IN_LEARNER)}
    users = {f for f in modules("learner") if "ray" in tops(f)}
    assert users - allowed == set(), f"{sorted(str(f.relative_to(ROOT)) for f in users - allowed)} import ray"


def test_core_algos_is_pure_torch():
    assert tops(ROOT / "learner" / "core_algos.py") <= {"__future__", "typing", "torch"}


def test_every_module_opens_with_a_docstring():
    missing = [str(f.relative_to(ROOT)) for f in modules(*PACKAGES)
               if not ast.get_docstring(ast.parse(f.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


def test_no_god_files():
    big = {str(f.relative_to(ROOT)): n for f in modules(*PACKAGES, "tests")
           if (n := len(f.read_text().splitlines())) > 600}
    assert not big, f"files over 600 lines: {big}"


def test_seats_for_the_next_features_exist():
    for seat in ("actors/rollout/engines", "actors/data", "actors/envs"):
        assert (ROOT / seat / "__init__.py").is_file(), seat
