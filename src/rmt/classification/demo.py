"""``rmt demo``: a local web page to try a classifier on a picture and see what MaSA does.

Upload an image (or pick one of the bundled examples): the page shows the top-5 classes, the
picture as the model sees it (after its resize and crop), and for the point you click on it the
MaSA attention of every stage (the heads' mean) and, for one stage, each head's spatial decay
``gamma_t ** d`` around that point and its attention, all drawn over the picture
(:mod:`rmt.tools.visualize` computes and draws them). The page says on which device and in which
precision the model runs. A file that is not an image, a truncated one or one too large gets a
message on the page.

The page's logic is plain functions over a :class:`Demo` (testable without a browser); the Gradio
layout (:func:`build_page`) only wires them to components. Gradio is an optional dependency
(``pip install "rmt[demo]"``); the page is served on ``127.0.0.1`` by default, with Gradio's
analytics off and no share link unless asked for.

The examples are drawn here, not downloaded: a few of scikit-learn's handwritten digits (the
test split of :class:`rmt.data.digits.DigitsDataset`, upsampled) and two images of the synthetic
shapes data (:func:`rmt.data.shapes.draw_shapes_image`), written once to a cache folder.
"""
from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ..data.digits import DigitsDataset
from ..data.image import BadImageError, load_rgb
from ..data.shapes import default_cache_dir, draw_shapes_image
from ..errors import RMTError
from ..files import atomic_write_bytes
from ..runtime.classifier import Classifier, load_classifier
from ..tools.visualize import (
    StageAttention,
    attention_figure,
    attention_maps,
    decay_maps,
    decay_summary,
    denormalise,
    figure_image,
    heads_figure,
    short_label,
)

__all__ = [
    "Demo",
    "DemoError",
    "Shown",
    "View",
    "example_images",
    "load_demo",
    "read_upload",
    "show",
    "view",
    "serve",
]

MAX_FILE_BYTES = 50 * 2 ** 20
"""The largest upload the page reads (50 MiB)."""
MAX_PIXELS = 40_000_000
"""The most pixels an uploaded image may have (40 megapixels)."""
DISPLAY_SIZE = 512
"""The longer side, in pixels, of the clickable picture (the page shows it smaller: Gradio maps a click to
the picture's pixels correctly only for a picture shown at its size or below)."""
TOPK = 5
EXAMPLE_DIGITS = (0, 3, 5, 7, 8)  # classes of the digit examples (the first test image of each)
_EXAMPLES_VERSION = 1


class DemoError(RMTError):
    """An upload the page cannot show; the message is for the page."""


# ------------------------------------------------------------------------------------------ model
@dataclass
class Demo:
    """A classifier and what the page says about it."""

    classifier: Classifier
    name: str  # the model's name, e.g. rmt_t
    weights: str  # where the weights come from: a checkpoint path, or "random weights"
    stages: list[dict[str, Any]] = field(default_factory=list)  # visualize.decay_summary
    # one picture at a time: attention_maps hooks the shared model, and the page serves several visitors
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self.stages = decay_summary(self.classifier.model)  # also refuses a model that is not an RMT

    @property
    def topk(self) -> int:
        return min(TOPK, len(self.classifier.class_names))

    def describe(self) -> str:
        """One Markdown line: the model, its weights, the device and the precision."""
        c, h, w = self.classifier.data_config["input_size"]
        weights = "random weights: the predictions mean nothing" if self.weights == "random weights" else self.weights
        return (f"**{self.name}** ({weights}) · input {h}x{w} · {len(self.classifier.class_names)} "
                f"classes · device **{self.classifier.device}** · predictions in **{self.classifier.precision}**, "
                f"maps in float32")


def load_demo(model: str | nn.Module | None = None, checkpoint: str | os.PathLike | None = None,
              device: str = "auto", amp: str = "auto") -> Demo:
    """The :class:`Demo` of a checkpoint (ours, official, a run's ``best.pth`` or a model folder)
    or of a model name with random weights; ``amp`` as for ``rmt predict`` (the maps are always float32)."""
    if model is None and checkpoint is None:
        raise RMTError("pass --checkpoint (a run's model.safetensors or best.pth, an official .pth, a model folder) "
                       "or --model NAME for random weights")
    classifier = load_classifier(model, checkpoint, device, amp)
    name = model if isinstance(model, str) else type(classifier.model).__name__
    name = getattr(classifier.model, "pretrained_cfg", {}).get("architecture") or name
    try:
        return Demo(classifier, name, str(checkpoint) if checkpoint is not None else "random weights")
    except RMTError as e:
        raise RMTError(f"rmt demo draws MaSA's maps: {e}") from e


# --------------------------------------------------------------------------------------- examples
def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def example_images(cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """The bundled examples, drawn on first use into ``<cache>/demo-examples-v1``: digits (white on
    black, 8x8 scans upsampled to 128x128) and two shapes images (160x160, three or four shapes each)."""
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"demo-examples-v{_EXAMPLES_VERSION}"
    wanted = [folder / f"digit_{d}.png" for d in EXAMPLE_DIGITS] + [folder / f"shapes_{i}.png" for i in range(2)]
    if all(p.is_file() for p in wanted):
        return wanted
    digits = DigitsDataset("test", img_size=128)
    for d, path in zip(EXAMPLE_DIGITS, wanted):
        index = int((digits.targets == d).nonzero()[0])
        grey = (digits.images[index, 0].numpy() * 255 + 0.5).astype(np.uint8)
        atomic_write_bytes(path, _png(Image.fromarray(grey, mode="L")))
    rng = np.random.default_rng(0)
    for path in wanted[len(EXAMPLE_DIGITS):]:
        objects: list = []
        while len(objects) < 3:  # a few shapes per picture, for a point to be clicked on each
            image, objects = draw_shapes_image(rng, 160, max_objects=4)
        atomic_write_bytes(path, _png(image))
    return wanted


# ----------------------------------------------------------------------------------------- images
def read_upload(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read an uploaded file as RGB; :class:`DemoError` with a message naming the file (not its
    server path) when it is empty, too large, not an image or damaged."""
    path = Path(path)
    name = path.name
    size = path.stat().st_size
    if size == 0:
        raise DemoError(f"{name} is empty")
    if size > max_bytes:
        raise DemoError(f"{name} is {size / 2 ** 20:.1f} MiB; the demo reads files up to {max_bytes / 2 ** 20:.0f} MiB")
    try:
        with Image.open(path) as image:  # the header only: refuse a huge picture before decoding it
            width, height = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DemoError(f"{name} is not an image this demo can read ({_reason(e, path)})") from e
    if width * height > max_pixels:
        raise DemoError(f"{name} is {width}x{height} pixels ({width * height / 1e6:.0f} MP); the demo reads images "
                        f"up to {max_pixels / 1e6:.0f} MP")
    try:
        return load_rgb(path)
    except BadImageError as e:
        raise DemoError(f"{name} could not be decoded: it is damaged or truncated "
                        f"({_reason(e.__cause__ or e, path)})") from e


def _reason(e: BaseException, path: Path) -> str:
    """The first line of an error, with the file's name for its (server-side) path."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text.replace(str(path), path.name)


# ------------------------------------------------------------------------------------------- page
@dataclass
class Shown:
    """The picture on the page: the model's input and the query point (fractions of height, width)."""

    name: str
    tensor: torch.Tensor  # (3, H, W), normalised
    query: tuple[float, float] = (0.5, 0.5)


@dataclass
class View:
    """Everything the page shows for one picture and query point."""

    top: dict[str, float]  # label -> probability, best first (top-5)
    picture: Image.Image  # the model's input, enlarged, with the query point marked: click on it
    overview: Image.Image  # each stage's attention (the heads' mean) of the query point
    heads: Image.Image  # one stage: decay and attention per head
    caption: str  # Markdown: the image, the best class, the query token per stage
    stages: list[StageAttention]


def show(demo: Demo, source: str | os.PathLike | Image.Image, name: str | None = None) -> Shown:
    """Read an upload (a file: :func:`read_upload`) or take an image, and preprocess it for the model."""
    if isinstance(source, Image.Image):
        image, name = source, name or "image"
    else:
        image, name = read_upload(source), name or Path(source).name
    return Shown(name, demo.classifier.preprocess(demo.classifier.read(image)))


def click_query(shown: Shown, x: float, y: float, width: int, height: int) -> Shown:
    """The same picture with the query point moved to pixel ``(x, y)`` of the ``width`` x ``height``
    picture the page shows (clicks outside are clamped to the picture)."""
    row = min(max((y + 0.5) / height, 0.0), 1.0)
    col = min(max((x + 0.5) / width, 0.0), 1.0)
    return Shown(shown.name, shown.tensor, (row, col))


def _enlarged(picture: np.ndarray, query: tuple[float, float]) -> Image.Image:
    image = Image.fromarray((picture * 255 + 0.5).astype(np.uint8))
    scale = DISPLAY_SIZE / max(image.size)
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BICUBIC
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    draw = ImageDraw.Draw(image)
    cy, cx = query[0] * image.height, query[1] * image.width
    r = max(4, DISPLAY_SIZE // 50)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill="white", outline="black", width=2)
    return image


def view(demo: Demo, shown: Shown, stage: int = 1, block: int = -1) -> View:
    """Classify the picture and draw the maps of its query point; ``stage`` (1-based) is the stage
    whose heads are drawn one by one."""
    if not 1 <= stage <= len(demo.stages):
        raise RMTError(f"stage {stage}: the model has stages 1 to {len(demo.stages)}")
    classifier = demo.classifier
    images = shown.tensor[None].to(classifier.device)
    with demo.lock:
        probs = classifier.probabilities(images)[0]
        stages = attention_maps(classifier.model, images, shown.query, block)
    top = classifier.top(probs, demo.topk)
    picture = denormalise(shown.tensor, classifier.data_config)
    best = top[0]
    fig, _ = attention_figure(picture, stages, shown.query,
                              f"predicted: {short_label(best['label'])} ({best['prob']:.1%})")
    fig.suptitle("MaSA attention of the query point, mean of the heads (scaled to each panel's maximum)", fontsize=11)
    overview = figure_image(fig, dpi=90)
    chosen = stages[stage - 1]
    decay = decay_maps(classifier.model, tuple(chosen.mean.shape), chosen.query)[stage - 1]
    heads = figure_image(heads_figure(picture, chosen, decay, demo.stages[stage - 1]["gamma"], shown.query), dpi=90)
    tokens = ", ".join(f"stage {s.stage + 1}: token {s.query} of {s.mean.shape[0]}x{s.mean.shape[1]}" for s in stages)
    caption = (f"**{shown.name}**: predicted **{best['label']}** ({best['prob']:.1%}). Query point at "
               f"({shown.query[0]:.2f}, {shown.query[1]:.2f}) of the height and width; {tokens}.")
    return View({e["label"]: e["prob"] for e in top}, _enlarged(picture, shown.query), overview, heads, caption,
                stages)


# ----------------------------------------------------------------------------------------- gradio
def _gradio():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio when it is imported and on launch
    try:
        import gradio
    except ImportError as e:
        raise RMTError(f"rmt demo needs Gradio: pip install \"rmt[demo]\" ({e})") from e
    return gradio


def build_page(demo: Demo, examples: list[Path] | None = None):
    """The Gradio page: a thin layout over :func:`show`, :func:`click_query` and :func:`view`."""
    gr = _gradio()
    examples = example_images() if examples is None else examples
    # system fonts: nothing to fetch from a font CDN
    theme = gr.themes.Base(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    stage_names = [f"stage {i + 1}" for i in range(len(demo.stages))]
    blank = (None, None, None, None)

    def outputs_of(shown: Shown | None, stage_name: str):
        v = view(demo, shown, stage_names.index(stage_name) + 1)
        return shown, "", v.caption, v.top, v.picture, v.overview, v.heads

    def failed(message: str):
        return (None, f"**Cannot show this file:** {message}", "", *blank)

    def on_source(source, stage_name):
        if source is None:  # the upload was cleared
            return (None, "", "", *blank)
        try:
            shown = show(demo, source)
        except DemoError as e:
            return failed(str(e))
        return outputs_of(shown, stage_name)

    def on_example(stage_name, evt: gr.SelectData):
        return outputs_of(show(demo, examples[evt.index]), stage_name)

    def on_click(shown, stage_name, evt: gr.SelectData):
        if shown is None:
            return (None, "", "", *blank)
        x, y = evt.index
        width, height = _enlarged(denormalise(shown.tensor, demo.classifier.data_config), shown.query).size
        return outputs_of(click_query(shown, x, y, width, height), stage_name)

    def on_stage(shown, stage_name):
        if shown is None:
            return (None, "", "", *blank)
        return outputs_of(shown, stage_name)

    # Gradio finds the event-data parameter by its annotation, which this module's postponed
    # annotations leave as a string naming a local import: give it the class
    for handler in (on_example, on_click):
        handler.__annotations__["evt"] = gr.SelectData

    with gr.Blocks(title="rmt demo", analytics_enabled=False) as page:
        gr.Markdown("## RMT demo: the top-5 classes and MaSA's decay and attention of a point you click")
        gr.Markdown(demo.describe(), elem_id="rmt-info")
        state = gr.State(None)
        with gr.Row():
            # any file: read_upload decides by the content, and says why it cannot show one
            upload = gr.File(label="Upload an image", height=150, scale=1, elem_id="rmt-upload")
            gallery = gr.Gallery([str(p) for p in examples], label="...or pick an example", columns=len(examples),
                                 height=150, allow_preview=False, interactive=False, scale=2, elem_id="rmt-examples")
        with gr.Row():
            picture = gr.Image(label="The model's input: click a point", interactive=False, type="pil", format="png",
                               height=360, scale=1, elem_id="rmt-picture")
            with gr.Column(scale=2):
                message = gr.Markdown(elem_id="rmt-message")
                top = gr.Label(num_top_classes=demo.topk, label="Top classes", elem_id="rmt-top")
                caption = gr.Markdown(elem_id="rmt-caption")
        overview = gr.Image(label="Attention of the query point per stage", interactive=False, type="pil",
                            format="png", elem_id="rmt-overview")
        stage = gr.Radio(stage_names, value=stage_names[0], label="Heads of", elem_id="rmt-stage")
        heads = gr.Image(label="Decay and attention per head", interactive=False, type="pil", format="png",
                         elem_id="rmt-heads")
        outputs = [state, message, caption, top, picture, overview, heads]
        upload.change(on_source, [upload, stage], outputs)
        gallery.select(on_example, [stage], outputs)
        picture.select(on_click, [state, stage], outputs)
        stage.change(on_stage, [state, stage], outputs)
    return page, theme


def serve(demo: Demo, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          ready=None) -> None:
    """Serve the page until interrupted; ``ready(url)`` is called once it answers."""
    page, theme = build_page(demo)
    try:
        _, url, _ = page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                                quiet=True, theme=theme, ssr_mode=False, mcp_server=False,
                                max_file_size=2 * MAX_FILE_BYTES, footer_links=[])
    except OSError as e:
        if "empty port" not in str(e):
            raise
        raise RMTError(f"port {port} on {host} is in use: pass another --port") from e
    if ready is not None:
        ready(url)
    try:
        page.block_thread()
    finally:
        page.close()
