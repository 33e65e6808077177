"""The README gives exactly two commands, and .ci/run runs the second one verbatim."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```\n(.*?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds)
    assert "pytest" in cmds[1] and "pytest" not in cmds[0]
    # each installs what it runs: the Hydra apps need the [train] extra, the tests the [test] one
    assert '-e ".[train]"' in cmds[0] and "experiments.train" in cmds[0]
    assert '-e ".[test]"' in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert readme_commands()[1] in ci_lines
