"""`rmt models`, `rmt flops` and the command's plumbing."""
import json
import subprocess
import sys

import pytest

from rmt.cli import main

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
    import timm
    import torch

    from rmt.tools.flops import count_macs

    with torch.device("meta"):
        model = timm.create_model("rmt_t")
    stage4 = model.layers[3].blocks[0].retention
    x = torch.zeros(1, 7, 7, 512, device="meta")
    tables = model.layers[3].relpos(7, 7, x)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        stage4(x, tables)
    linear = 49 * 512 * 512 * 4  # q, k, v, out
    lepe = 49 * 512 * 5 * 5
    attention = 2 * 49 * 49 * 512  # q k^T and A v over 49 tokens
    assert counter.get_total_flops() // 2 == linear + lepe + attention
    assert count_macs(model) > 0


def test_python_dash_m_and_errors():
    done = subprocess.run([sys.executable, "-m", "rmt", "flops", "rmt_q"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["rmt: error: unknown model 'rmt_q' (did you mean 'rmt_t'?); "
                                                "choose from rmt_t, rmt_s, rmt_b, rmt_l"]
    done = subprocess.run([sys.executable, "-m", "rmt", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "flops" in done.stdout
