"""`rmt visualize`: the decay maps, the attention of a query point (checked against the real MaSA
output), Grad-CAM, and the PNGs the commands write."""
import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data as skdata

from conftest import write_run_checkpoint
from golden import TINY_ARGS
from rmt.cli import main
from rmt.models import RMT
from rmt.tools.visualize import attention_maps, decay_maps, grad_cam

# 64 px -> token grids 16, 8, 4, 2; stages 1-2 decomposed, 3-4 full, two blocks in stage 3
TINY = dict(TINY_ARGS, decomposed=(True, True, False, False))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = RMT(**TINY).eval()
    with torch.no_grad():  # larger q/k weights than the init: sharper, less uniform attention to check
        for stage in model.layers:
            for block in stage.blocks:
                block.retention.qkv.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    """An `rmt train`-style checkpoint of rmt_t at 64 px with its class names."""
    torch.manual_seed(0)
    config = {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225], "crop_pct": 1.0}
    meta = dict(task="classification", model="rmt_t", class_names=["cat", "astronaut"], num_classes=2,
                token_label=False, data_config=config)
    return write_run_checkpoint(tmp_path_factory.mktemp("run") / "best.pth",
                                timm.create_model("rmt_t", num_classes=2), meta)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "chelsea.jpg"
    Image.fromarray(skdata.chelsea()).save(path)
    return path


def test_decay_maps_follow_the_formula(tiny):
    maps = decay_maps(tiny, grid=(7, 9), query=(2, 3))
    assert [m.shape for m in maps] == [(n, 7, 9) for n in TINY["num_heads"]]
    for stage_maps, n, a, b in zip(maps, TINY["num_heads"], TINY["init_values"], TINY["heads_ranges"]):
        for t in range(n):
            gamma = 1 - 2 ** (-a - b * t / n)  # exp(lambda_t), the paper's decay rate
            assert stage_maps[t, 2, 3] == 1.0
            for r, c in [(0, 0), (6, 8), (2, 4), (5, 3)]:
                d = abs(r - 2) + abs(c - 3)
                assert math.isclose(float(stage_maps[t, r, c]), gamma ** d, rel_tol=1e-5)


def _masa_inputs(model, images):
    """The input and tables of every block's MaSA, captured by hooks (independently of the visualizer)."""
    seen = {}
    handles = [block.retention.register_forward_pre_hook(
        lambda m, args, key=(i, j): seen.__setitem__(key, (args[0], args[1])))
        for i, stage in enumerate(model.layers) for j, block in enumerate(stage.blocks)]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return seen


def test_query_weights_reproduce_the_masa_output(tiny):
    """The weights explain MaSA's real output at the query: out_proj(sum_j w_j v_j + lepe(v))."""
    torch.manual_seed(1)
    images = torch.randn(1, 3, 64, 64)
    for (i, j), (x, tables) in _masa_inputs(tiny, images).items():
        masa = tiny.layers[i].blocks[j].retention
        _, h, w, c = x.shape
        n, d = masa.num_heads, masa.key_dim
        for query in [(0, 0), (h // 2, w - 1), (h - 1, w // 3)]:
            weights = masa.query_weights(x, tables, query)  # (n, h, w)
            assert weights.shape == (n, h, w)
            assert weights.min() >= 0 and torch.allclose(weights.sum((1, 2)), torch.ones(n, dtype=weights.dtype))
            with torch.no_grad():
                v = masa.qkv(x)[..., 2 * c:]
                mixed = torch.einsum("nhw,hwnd->nd", weights, v[0].unflatten(-1, (n, d)).double()).flatten()
                expected = masa.out_proj(mixed.float() + masa.lepe(v)[0][query])
                actual = masa(x, tables)[0][query]
            assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-4), (i, j, query)


def test_attention_maps_pick_the_query_token_and_block(tiny):
    images = torch.randn(1, 3, 64, 96)
    stages = attention_maps(tiny, images, query=(0.0, 1.0), block=0)
    assert [s.weights.shape[1:] for s in stages] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [s.query for s in stages] == [(0, 23), (0, 11), (0, 5), (0, 2)]  # the top-right corner token
    assert [s.decomposed for s in stages] == list(TINY["decomposed"])
    assert [s.block for s in stages] == [0, 0, 0, 0]
    assert attention_maps(tiny, images, block=-1)[2].block == TINY["depths"][2] - 1
    for s in stages:
        assert torch.allclose(s.mean.sum(), torch.tensor(1.0, dtype=torch.float64))
        summary = s.summary()
        assert json.loads(json.dumps(summary))["grid"] == list(s.mean.shape)


def test_grad_cam_matches_the_definition(tiny):
    images = torch.randn(1, 3, 64, 64)
    cam, index = grad_cam(tiny, images)
    with torch.no_grad():
        assert index == int(tiny(images).argmax())
    assert cam.shape == (2, 2) and cam.min() >= 0 and cam.max() <= 1
    # the definition by hand: relu(sum_c mean(dlogit/dF_c) F_c), scaled to a maximum of 1
    features = tiny.forward_features(images).detach().requires_grad_(True)
    logit = tiny.forward_head(features)[0, index]
    (grad,) = torch.autograd.grad(logit, features)
    by_hand = torch.relu((grad[0].mean((1, 2))[:, None, None] * features[0]).sum(0)).double()
    if by_hand.max() > 0:
        by_hand = by_hand / by_hand.max()
    assert torch.allclose(cam, by_hand.detach(), atol=1e-6)
    other, other_index = grad_cam(tiny, images, class_index=(index + 1) % 10)
    assert other_index == (index + 1) % 10 and other.shape == cam.shape and 0 <= other.min() <= other.max() <= 1


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_cli_decay_png_and_json(tmp_path, capsys):
    out = tmp_path / "decay.png"
    assert main(["visualize", "decay", "--model", "rmt_t", "--output", str(out), "--grid", "9", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["output"] == str(out)
    assert [s["heads"] for s in result["stages"]] == [4, 4, 8, 16]
    assert [s["decomposed"] for s in result["stages"]] == [True, True, False, False]
    assert math.isclose(result["stages"][0]["gamma"][0], 1 - 2 ** -2, rel_tol=1e-6)  # float32 buffers
    width, height = _png_size(out)
    assert width > 1000 and height > 300  # 16 panels across, 4 rows


def test_cli_attention_with_cam(photo, run_checkpoint, tmp_path, capsys):
    out = tmp_path / "attn.png"
    rc = main(["visualize", "attention", str(photo), "--checkpoint", str(run_checkpoint), "--output", str(out),
               "--cam", "--query", "0.25", "0.75"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert printed.startswith(f"wrote {out}: input 64x64, predicted ")
    assert "stage 1 (decomposed, block 2, 16x16 tokens" in printed and "query token (4, 12)" in printed
    assert "stage 4 (full, block 2, 2x2 tokens" in printed
    assert "Grad-CAM of " in printed
    width, height = _png_size(out)
    assert width >= 5 * height  # input + 4 stages + Grad-CAM side by side
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.std() > 20  # not blank


def test_cli_attention_user_errors(photo, run_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    args = ["--checkpoint", str(run_checkpoint), "--output", str(tmp_path / "a.png")]
    assert main(["visualize", "attention", str(bad), *args]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["visualize", "attention", str(photo), *args, "--query", "1.5", "0.5"]) == 2
    assert "--query" in capsys.readouterr().err
    assert main(["visualize", "attention", str(photo), *args, "--block", "5"]) == 2
    assert "--block 5" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
