"""Property: whatever values the flags of any `rmt` command get, the command exits 0, or exits 2 with one
line on stderr and no traceback. The work behind each command is replaced by a stub, so that what is
exercised is the parsers, the config mechanism and the checks that run before any work starts."""
import argparse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmt import cli
from rmt.training.run import RunResult

# a value a careless or hostile user could type
NASTY = st.one_of(
    st.integers(min_value=-(10 ** 12), max_value=10 ** 12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-1", "1e400", "nan", "-inf", "", " ", "none", "null", "true", "[1, 2]", "{}", "0x10",
                     "1,2", "rmt_q", "../..", "/dev/null", "\u00e9\u00e8", "--", "-5e-3"]),
    st.text(max_size=12),
)


def _subcommands(parser: argparse.ArgumentParser, prefix=()):
    """Every leaf command of the parser: ``(argv prefix, its parser)``."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _subcommands(sub, prefix + (name,))
    return found or [(prefix, parser)]


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    """The `rmt` parser with the work of every command replaced by a quick success: `train` commands keep
    their config loading and checks (only the training itself is stubbed), the others their parsers."""
    monkeypatch.chdir(tmp_path)
    done = RunResult(tmp_path, "metric", None, None, {})
    for module in ("rmt.classification.cli", "rmt.detection.cli", "rmt.segmentation.cli"):
        monkeypatch.setattr(f"{module}.train", lambda cfg: done)
    parser = cli.build_parser()
    commands = _subcommands(parser)
    for prefix, sub in commands:
        if prefix[-1] != "train":
            sub.set_defaults(func=lambda args: 0)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    return commands


def _argv(data, commands):
    prefix, parser = data.draw(st.sampled_from(commands))
    argv = list(prefix)
    options = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "debug")]
    for action in data.draw(st.lists(st.sampled_from(options), max_size=4, unique_by=lambda a: a.dest)
                            if options else st.just([])):
        flag = action.option_strings[-1]
        if action.nargs == 0:
            argv.append(flag)
            continue
        count = action.nargs if isinstance(action.nargs, int) else (1 if action.nargs in (None, "?") else 2)
        argv += [flag] + [data.draw(NASTY) for _ in range(count)]
    positionals = [a for a in parser._actions if not a.option_strings and a.dest != "help"
                   and not isinstance(a, argparse._SubParsersAction)]
    for _ in positionals:
        argv.append(data.draw(NASTY))
    return argv


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_flag_values_exit_0_or_2_with_one_line(stubbed, capsys, data):
    argv = _argv(data, stubbed)
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        assert err and "\n" not in err and "error" in err, (argv, err)


def test_the_fuzzer_reaches_every_command(stubbed):
    names = {" ".join(prefix) for prefix, _ in stubbed}
    assert {"train", "eval", "predict", "token-labels", "det train", "seg train", "det predict"} <= names
