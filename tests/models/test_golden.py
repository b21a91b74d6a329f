"""Parity with the official implementation on its own outputs (tests/fixtures/golden)."""
import pytest
import timm
import torch

from golden import TINY_CASES, case_input, load_golden, official_state_dict
from rmt.models.reference import ReferenceRMT

TOL = 1e-4  # float32 round-off; measured errors are ~1e-6


def _check_case(logits, stages_nhwc, case):
    assert torch.allclose(logits, torch.tensor(case["logits"]), atol=TOL, rtol=0), \
        (logits - torch.tensor(case["logits"])).abs().max()
    assert [list(s.shape) for s in stages_nhwc] == case["stage_shapes"]
    for s, total, abs_total, first in zip(stages_nhwc, case["stage_sum"], case["stage_abs_sum"], case["stage_first"]):
        s = s.double()
        assert abs(s.sum().item() - total) <= 1e-5 * s.numel() + 1e-5 * abs(total)
        assert abs(s.abs().sum().item() - abs_total) <= 1e-5 * abs_total
        assert torch.allclose(s.flatten()[:64], torch.tensor(first, dtype=torch.float64), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(TINY_CASES))
@pytest.mark.parametrize("wrap,prefix", [("model", ""), ("state_dict", "module."), ("model_ema", "")])
def test_official_file_reproduces_reference_outputs(golden_checkpoint, name, wrap, prefix):
    path, data, args = golden_checkpoint(name, wrap=wrap, prefix=prefix)
    model = timm.create_model("rmt_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                              **args).eval()
    for case in data["cases"]:
        x = case_input(case)
        with torch.no_grad():
            logits = model(x)
            stages = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        _check_case(logits, stages, case)


@pytest.mark.parametrize("name", sorted(TINY_CASES))
def test_reference_oracle_reproduces_reference_outputs(name):
    data = load_golden(name)
    model = ReferenceRMT(**TINY_CASES[name]).eval()
    model.load_state_dict(official_state_dict(data["keys"]))
    for case in data["cases"]:
        x = case_input(case)
        with torch.no_grad():
            _check_case(model(x), model.forward_stages(x), case)


def test_golden_check_detects_a_wrong_model(golden_checkpoint):
    """The comparison can fail: the same weights in a model with another decomposition pattern."""
    path, data, args = golden_checkpoint("official_tiny")
    args["decomposed"] = (True, True, True, False)  # stage 3 is full MaSA in the reference
    model = timm.create_model("rmt_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                              **args).eval()
    case = data["cases"][0]
    with torch.no_grad():
        logits = model(case_input(case))
    assert not torch.allclose(logits, torch.tensor(case["logits"]), atol=TOL, rtol=0)
