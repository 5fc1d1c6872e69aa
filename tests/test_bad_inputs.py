"""Every bad input of `benchmarks/bad_inputs_table.py` (configs, overrides, model folders, checkpoints,
shards, task files, CLI values, across all commands) gives exit status 2 and exactly one `error:` line
naming the input, never a traceback. The cases live in that module so the table and this test agree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bad_inputs_table as table  # noqa: E402

from bertforge.cli import COMMANDS  # noqa: E402


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> table.Fixtures:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread beats two fighting over a shared CPU
    yield table.build_fixtures(tmp_path_factory.mktemp("bad_inputs"))
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", table.CASES, ids=[c.id for c in table.CASES])
def test_bad_input_gives_one_error_line(case, fixtures, tmp_path):
    outcome, needles = table.run_case(case, fixtures, tmp_path / "case")
    assert not outcome.traceback and "Traceback" not in outcome.stderr, outcome.traceback or outcome.stderr
    assert outcome.rc == 2, outcome.stderr
    lines = outcome.error_lines()
    assert len(lines) == 1, outcome.stderr
    if not outcome.stderr.startswith("usage: "):  # argparse's own errors: usage lines, then the error line
        assert outcome.stderr.startswith("error: ") and outcome.stderr.count("\n") == 1, repr(outcome.stderr)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert table.problems(outcome, needles) == []  # the table's verdict agrees


def test_cases_cover_every_command_and_are_distinct():
    assert len(table.CASES) >= 40
    assert set(COMMANDS) <= {c.command for c in table.CASES}
    assert len({c.id for c in table.CASES}) == len({c.bad_input + c.command for c in table.CASES}) == len(table.CASES)


def test_the_table_flags_tracebacks_extra_lines_and_missing_names(tmp_path):
    ok = table.Outcome(2, "", "error: config file 'a.yaml' does not parse\n", "")
    assert table.problems(ok, ["a.yaml"]) == []
    assert table.problems(ok, ["b.yaml"]) == ["error line lacks 'b.yaml'"]
    crashed = table.Outcome(None, "", "", "Traceback (most recent call last):\nValueError: boom\n")
    assert table.problems(crashed, [])[0] == "traceback: ValueError: boom"
    two_lines = table.Outcome(2, "", "warning: x\nerror: y\n", "")
    assert table.problems(two_lines, []) == [f"stderr is more than the error line: {two_lines.stderr!r}"]
    passed = table.Outcome(0, "fine\n", "", "")
    assert table.problems(passed, []) == ["exit status 0, not 2", "0 error lines: ''"]
    case = table.CASES[0]
    md = table.markdown_table([(case, ok, []), (case, crashed, ["traceback: ValueError: boom"])], tmp_path)
    assert md.splitlines()[0] == "| command | bad input | error line |"
    assert "`` error: config file 'a.yaml' does not parse ``" in md.splitlines()[2]
    assert "**FAILS**: traceback: ValueError: boom" in md.splitlines()[3]
