"""The README stays true: its config reference is generated from the code, and
CI runs the test command it shows."""

import re
from pathlib import Path

from learner.config import reference_markdown

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_config_reference_matches_the_code():
    m = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", README, re.S)
    assert m, "README lacks the config-reference block"
    assert m.group(1).strip() == reference_markdown().strip(), \
        "README config reference is stale: regenerate it with `fleetrl config --reference`"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```\n(.*?)```", README, re.S)
    test_cmds = [line.strip() for b in blocks for line in b.splitlines() if "pytest" in line]
    assert test_cmds, "README shows no test command"
    assert any(cmd in ci for cmd in test_cmds)


def test_failure_table_names_tests_that_exist():
    """Every ``test_x.py::name`` (and ``::name`` continuing the previous file) in the README's
    "Failure behaviour" table is a test function in that file."""
    section = README.split("## Failure behaviour", 1)[1].split("\n## ", 1)[0]
    named = 0
    for row in (line for line in section.splitlines() if line.startswith("| ")):
        current = None
        for file, name in re.findall(r"`(test_\w+\.py)?::(\w+)`", row.split("|")[-2]):
            current = file or current
            assert current, f"{name}: no file named before it in {row[:80]}"
            source = (ROOT / "tests" / current).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{current}::{name} does not exist"
            named += 1
    assert named >= 20, named
