"""The `rmt` command line: its plumbing, `rmt models` and `rmt flops`, and one property of every command.

Property: whatever values the flags of any `rmt` command get, the command exits 0, or exits 2 with one
line on stderr and no traceback. The work behind each command is replaced by a stub, so that what is
exercised is the parsers, the config mechanism and the checks that run before any work starts."""
import argparse
import json
import subprocess
import sys

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from rmt import cli
from rmt.cli import main
from rmt.tools.flops import count_macs
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


# ------------------------------------------------ rmt models, rmt flops and the command's plumbing
SPEC_GFLOPS = {"rmt_t": 2.65, "rmt_s": 4.80, "rmt_b": 10.41, "rmt_l": 19.55}  # fvcore on the reference


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for row in ["rmt_t.in1k", "14,334,216", "rmt_s.tl_in1k", "27,480,240", "84.8", "rmt_l.in1k", "95,464,864"]:
        assert row in out


@pytest.mark.parametrize("name", list(SPEC_GFLOPS))
def test_flops_within_one_percent_of_spec(name, capsys):
    assert main(["flops", name, "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert abs(facts["gflops"] / SPEC_GFLOPS[name] - 1) < 0.01
    assert facts["params"] > 1e7


def test_flops_count_attention_and_scale_with_size(capsys):
    main(["flops", "rmt_t", "--img-size", "448", "448", "--json"])
    at_448 = json.loads(capsys.readouterr().out)["gflops"]
    main(["flops", "rmt_t", "--json"])
    at_224 = json.loads(capsys.readouterr().out)["gflops"]
    # 4x the pixels; full MaSA in stages 3-4 grows quadratically, so more than 4x
    assert at_448 > 4.05 * at_224
    main(["flops", "rmt_s", "--img-size", "97", "131"])
    assert "rmt_s at 97x131" in capsys.readouterr().out


def test_attention_matmuls_are_counted():
    with torch.device("meta"):
        model = timm.create_model("rmt_t")
    stage4 = model.layers[3].blocks[0].retention
    x = torch.zeros(1, 7, 7, 512, device="meta")
    tables = model.layers[3].relpos(7, 7, x)

    with FlopCounterMode(display=False) as counter:
        stage4(x, tables)
    linear = 49 * 512 * 512 * 4  # q, k, v, out
    lepe = 49 * 512 * 5 * 5
    attention = 2 * 49 * 49 * 512  # q k^T and A v over 49 tokens
    assert counter.get_total_flops() // 2 == linear + lepe + attention
    assert count_macs(model) > 0


@pytest.mark.e2e
def test_python_dash_m_and_errors():
    done = subprocess.run([sys.executable, "-m", "rmt", "flops", "rmt_q"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["rmt: error: unknown model 'rmt_q' (did you mean 'rmt_t'?); "
                                                "choose from rmt_t, rmt_s, rmt_b, rmt_l"]
    done = subprocess.run([sys.executable, "-m", "rmt", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "flops" in done.stdout
