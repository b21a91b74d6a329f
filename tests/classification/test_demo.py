"""`rmt demo`: the page's functions without a browser (the examples, reading uploads, the top-5 and
the maps of a clicked point, the command's errors). tests/classification/test_demo_browser.py drives the page itself."""
import io
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from golden import TINY_ARGS
from rmt.classification.demo import (
    DISPLAY_SIZE,
    Demo,
    DemoError,
    build_page,
    click_query,
    example_images,
    load_demo,
    read_upload,
    show,
    view,
)
from rmt.cli import main
from rmt.errors import RMTError
from rmt.models import RMT
from rmt.runtime.classifier import Classifier
from rmt.tools.visualize import attention_maps

DIGITS_CONFIG = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                 "crop_pct": 1.0, "grayscale": True}


@pytest.fixture(scope="module")
def demo():
    """A tiny RMT on the digits' preprocessing: 32 px -> token grids 8, 4, 2, 1; 2, 2, 4, 4 heads."""
    torch.manual_seed(0)
    model = RMT(**dict(TINY_ARGS, decomposed=(True, True, False, False)))
    classifier = Classifier(model, DIGITS_CONFIG, [str(i) for i in range(10)], device="cpu", amp="none")
    return Demo(classifier, "tiny", "random weights")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return example_images(tmp_path_factory.mktemp("cache"))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_examples_are_drawn_once_and_readable(examples):
    assert [p.name for p in examples] == [f"digit_{d}.png" for d in (0, 3, 5, 7, 8)] + ["shapes_0.png",
                                                                                        "shapes_1.png"]
    digit = np.asarray(read_upload(examples[0]))
    assert digit.shape == (128, 128, 3)
    assert digit.max() > 200 and digit.min() < 30  # a white digit on black
    assert (digit[..., 0] == digit[..., 2]).all()  # grey
    shapes = np.asarray(read_upload(examples[-1]))
    assert shapes.shape == (160, 160, 3) and shapes.std() > 5
    stamps = [p.stat().st_mtime_ns for p in examples]
    assert example_images(examples[0].parent.parent) == examples
    assert [p.stat().st_mtime_ns for p in examples] == stamps  # not drawn again


def test_bad_uploads_get_a_message_naming_the_file(tmp_path):
    cases = {
        "empty.png": (b"", "empty.png is empty"),
        "notes.png": (b"these are not pixels\n" * 10, "notes.png is not an image this demo can read"),
        "cut.png": (_png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
                    [:600], "cut.png could not be decoded: it is damaged or truncated"),
        "huge.png": (_png(Image.new("1", (9000, 5000))), "huge.png is 9000x5000 pixels (45 MP); the demo reads "
                                                         "images up to 40 MP"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DemoError) as info:
            read_upload(path)
        assert str(info.value).startswith(message), (name, str(info.value))
        assert str(tmp_path) not in str(info.value)  # the server's upload folder is not shown
    big = tmp_path / "big.png"
    big.write_bytes(_png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8))))
    with pytest.raises(DemoError, match=r"^big.png is 1.4 MiB; the demo reads files up to 1 MiB$"):
        read_upload(big, max_bytes=2 ** 20)
    assert read_upload(big).size == (700, 700)


def test_view_shows_the_top5_and_the_maps_of_the_query(demo, examples):
    shown = show(demo, examples[1])
    assert shown.name == "digit_3.png" and shown.query == (0.5, 0.5)
    assert shown.tensor.shape == (3, 32, 32)
    v = view(demo, shown)
    probs = list(v.top.values())
    assert len(v.top) == 5 and set(v.top) <= {str(i) for i in range(10)}
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    expected = demo.classifier.top(demo.classifier.probabilities(shown.tensor[None])[0], 5)
    assert list(v.top) == [e["label"] for e in expected]
    assert [s.query for s in v.stages] == [(4, 4), (2, 2), (1, 1), (0, 0)]
    assert v.picture.size == (DISPLAY_SIZE, DISPLAY_SIZE)
    for image in (v.overview, v.heads):
        assert np.asarray(image).std() > 20  # drawn, not blank
    assert v.overview.width > 4 * v.overview.height  # input + 4 stages side by side
    assert "**digit_3.png**: predicted" in v.caption and "stage 1: token (4, 4) of 8x8" in v.caption
    # stage 3 has 4 heads, drawn one by one in two rows (decay, attention): a wider picture than stage 1's 2 heads
    assert view(demo, shown, stage=3).heads.width > v.heads.width
    with pytest.raises(RMTError, match="stage 5: the model has stages 1 to 4"):
        view(demo, shown, stage=5)


def test_a_click_moves_the_query_point(demo, examples):
    shown = show(demo, examples[0])
    y = DISPLAY_SIZE - 20
    moved = click_query(shown, x=10, y=y, width=DISPLAY_SIZE, height=DISPLAY_SIZE)
    assert moved.query == pytest.approx(((y + 0.5) / DISPLAY_SIZE, (10 + 0.5) / DISPLAY_SIZE))
    assert click_query(shown, x=-5, y=DISPLAY_SIZE + 9, width=DISPLAY_SIZE, height=DISPLAY_SIZE).query == (1.0, 0.0)
    before, after = view(demo, shown), view(demo, moved)
    assert [s.query for s in after.stages] == [(7, 0), (3, 0), (1, 0), (0, 0)]
    assert "Query point at (0.96, 0.02)" in after.caption
    # the maps are those of the new point: what attention_maps gives for it
    direct = attention_maps(demo.classifier.model, moved.tensor[None], moved.query)
    for got, want in zip(after.stages, direct):
        torch.testing.assert_close(got.weights, want.weights)
    assert not torch.allclose(before.stages[0].weights, after.stages[0].weights)
    assert np.abs(np.asarray(before.picture, dtype=int) - np.asarray(after.picture, dtype=int)).max() > 100  # marker
    assert before.top == after.top  # the classes do not depend on the point


def test_visitors_at_the_same_time_get_their_own_maps(demo, examples):
    """Gradio runs each visitor's events in its own thread, on the one model that attention_maps hooks."""
    shown = [show(demo, examples[0]), click_query(show(demo, examples[5]), 40, 400, DISPLAY_SIZE, DISPLAY_SIZE)]
    alone = [attention_maps(demo.classifier.model, s.tensor[None], s.query) for s in shown]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: view(demo, shown[i % 2]).stages, range(8)))
    for i, stages in enumerate(together):
        for got, want in zip(stages, alone[i % 2]):
            torch.testing.assert_close(got.weights, want.weights)


def test_in_memory_images_and_grayscale(demo):
    colour = Image.fromarray(np.dstack([np.full((40, 40), v, np.uint8) for v in (255, 0, 0)]))
    shown = show(demo, colour, name="red")
    assert shown.name == "red"
    assert torch.allclose(shown.tensor[0], shown.tensor[1])  # the digits models read grey images


def test_describe_names_device_and_precision(demo):
    text = demo.describe()
    assert "**tiny** (random weights: the predictions mean nothing)" in text
    assert "input 32x32" in text and "10 classes" in text and "device **cpu**" in text
    assert "predictions in **float32**" in text


def test_load_demo_and_command_errors(capsys):
    with pytest.raises(RMTError, match="pass --checkpoint"):
        load_demo()
    assert main(["demo"]) == 2
    assert "pass --checkpoint" in capsys.readouterr().err
    assert main(["demo", "--model", "resnet18", "--device", "cpu"]) == 2
    assert "unknown model 'resnet18'" in capsys.readouterr().err
    with pytest.raises(RMTError, match="rmt demo draws MaSA's maps: ResNet is not an RMT model"):
        load_demo(timm.create_model("resnet10t", num_classes=3), device="cpu")
    assert main(["demo", "--checkpoint", "no/such/file.pth"]) == 2
    assert capsys.readouterr().err.startswith("rmt: error: ")


@pytest.mark.e2e
def test_a_busy_port_is_one_line(capsys):
    pytest.importorskip("gradio", reason="the demo extra is not installed")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["demo", "--model", "rmt_t", "--device", "cpu", "--amp", "none", "--port", str(port)]) == 2
    assert f"rmt: error: port {port} on 127.0.0.1 is in use: pass another --port" in capsys.readouterr().err
    assert main(["demo", "--model", "rmt_t", "--port", "70000"]) == 2
    assert "must be a port number from 1 to 65535, got 70000" in capsys.readouterr().err


def test_missing_gradio_is_one_line_naming_the_extra(demo, examples, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gradio", None)
    with pytest.raises(RMTError, match=r'rmt demo needs Gradio: pip install "rmt\[demo\]"'):
        build_page(demo, examples)


def test_page_layout_builds(demo, examples):
    pytest.importorskip("gradio", reason="the demo extra is not installed")
    page, _ = build_page(demo, examples)
    ids = {block.elem_id for block in page.blocks.values()}
    assert {"rmt-upload", "rmt-examples", "rmt-picture", "rmt-top", "rmt-message", "rmt-overview",
            "rmt-heads"} <= ids
    assert page.analytics_enabled is False
