"""Pictures of what MaSA does: ``rmt visualize decay`` and ``rmt visualize attention``.

**Decay.** Each head ``t`` of a stage has a decay rate ``lambda_t = log(1 - 2 ** (-a - b * t / n))``
(``a``: the stage's ``init_value``, ``b``: its ``heads_range``, ``n``: its heads). MaSA adds
``lambda_t * d`` to the attention logit between two tokens at Manhattan distance ``d``, which
multiplies their (unnormalised) attention weight by ``gamma_t ** d`` with ``gamma_t = exp(lambda_t)``.
:func:`decay_maps` draws ``gamma_t ** d`` around a query token, one map per head, as in the paper's
figures. Decomposed stages apply the same rates as ``gamma_t ** |dr|`` in the height pass and
``gamma_t ** |dc|`` in the width pass.

**Attention.** :func:`attention_maps` captures the input of one block's MaSA per stage (a forward
pre-hook on ``layers[i].blocks[j].retention``) and asks that module for the softmax weights of one
query token (:meth:`rmt.models.masa.MaSA.query_weights`, which forms them explicitly):

* full MaSA: ``softmax_j(q'_i . k'_j * s + lambda_t * D(i, j))`` over all tokens;
* decomposed MaSA: the width pass (each row) then the height pass (the query's column) on the
  updated values make the output at query ``(r, c)`` a weighted sum of the values with weight
  ``A_h[c](r, r') * A_w[r'](c, c')`` on token ``(r', c')``, where ``A_w[r']`` is the width pass of
  row ``r'`` and ``A_h[c]`` the height pass of column ``c``.

Both sum to one over the tokens for every head. The pictures average the heads. LePE (a
depthwise convolution of the values added to the attention output) is not attention and is not
drawn.

**Grad-CAM** (:func:`grad_cam`): the last stage's feature map weighted by the spatial mean of the
gradient of a class logit with respect to it, rectified and scaled to ``[0, 1]``.
"""
from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.image import BadImageError
from ..errors import RMTError
from ..files import atomic_write_bytes
from ..models.masa import MaSATables
from ..runtime.classifier import Classifier, load_classifier

__all__ = [
    "StageAttention",
    "attention_figure",
    "attention_maps",
    "decay_maps",
    "denormalise",
    "figure_image",
    "grad_cam",
    "heads_figure",
    "plot_attention",
    "plot_decay",
    "short_label",
    "visualize_attention",
    "visualize_decay",
]


# ------------------------------------------------------------------------------------------ decay
def _stages(model: nn.Module) -> Sequence[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None or not all(hasattr(s, "relpos") for s in layers):
        raise RMTError(f"{type(model).__name__} is not an RMT model (no layers[i].relpos)")
    return layers


def decay_maps(model: nn.Module, grid: tuple[int, int] = (21, 21),
               query: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """``gamma_t ** d`` on a ``grid`` of tokens around ``query`` (default: the centre), per stage.

    Returns one ``(heads, grid_h, grid_w)`` tensor per stage; ``d`` is the Manhattan distance
    ``|r - r0| + |c - c0|`` and ``gamma_t = exp(lambda_t)`` with ``lambda_t`` the stage's
    ``relpos.decay[t]``.
    """
    gh, gw = grid
    r0, c0 = query if query is not None else (gh // 2, gw // 2)
    if not (0 <= r0 < gh and 0 <= c0 < gw):
        raise RMTError(f"query token {(r0, c0)} is outside the {gh}x{gw} grid")
    rows = torch.arange(gh, dtype=torch.float64)[:, None]
    cols = torch.arange(gw, dtype=torch.float64)[None, :]
    distance = (rows - r0).abs() + (cols - c0).abs()
    return [torch.exp(stage.relpos.decay.detach().cpu().double()[:, None, None] * distance) for stage in _stages(model)]


def decay_summary(model: nn.Module) -> list[dict[str, Any]]:
    """Per stage: ``decomposed``, ``lambda`` and ``gamma`` per head, and the distance at which
    ``gamma ** d`` falls to one half (``log 0.5 / lambda``)."""
    rows = []
    for i, stage in enumerate(_stages(model)):
        lam = stage.relpos.decay.detach().cpu().double()
        rows.append(dict(stage=i + 1, decomposed=bool(stage.relpos.decomposed), heads=int(lam.numel()),
                         **{"lambda": lam.tolist()}, gamma=lam.exp().tolist(),
                         half_distance=(math.log(0.5) / lam).tolist()))
    return rows


def _save(fig, output: str | os.PathLike, dpi: int) -> Path:
    """Write the figure atomically, in the format its name says (PNG by default)."""
    output = Path(output)
    kind = output.suffix.lstrip(".").lower() or "png"
    if kind not in fig.canvas.get_supported_filetypes():
        raise RMTError(f"--output {output}: cannot write .{kind} pictures; use .png, .pdf, .svg or .jpg")
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=kind)
    return atomic_write_bytes(output, buffer.getvalue())


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_decay(model: nn.Module, output: str | os.PathLike, grid: tuple[int, int] = (21, 21),
               query: tuple[int, int] | None = None, title: str | None = None, dpi: int = 110) -> Path:
    """Draw :func:`decay_maps`: one row per stage, one panel per head, one shared colour scale."""
    maps = decay_maps(model, grid, query)
    summary = decay_summary(model)
    columns = max(m.shape[0] for m in maps)
    fig = _figure(1.45 * columns + 1.2, 1.75 * len(maps) + 0.6)
    axes = fig.subplots(len(maps), columns, squeeze=False)
    image = None
    for i, (stage_maps, info) in enumerate(zip(maps, summary)):
        kind = "decomposed" if info["decomposed"] else "full"
        for t in range(columns):
            ax = axes[i][t]
            ax.set_xticks([])
            ax.set_yticks([])
            if t >= stage_maps.shape[0]:
                ax.set_axis_off()
                continue
            image = ax.imshow(stage_maps[t].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"t={t}  \u03b3={info['gamma'][t]:.3f}", fontsize=8)
            if t == 0:
                ax.set_ylabel(f"stage {i + 1}\n({kind})", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="\u03b3$_t^{|\\Delta r|+|\\Delta c|}$")
    fig.suptitle(title or f"MaSA spatial decay around the centre token ({grid[0]}x{grid[1]} tokens), per head",
                 fontsize=11)
    return _save(fig, output, dpi)


# -------------------------------------------------------------------------------------- attention
@dataclass
class StageAttention:
    """The attention of one query token in one block of a stage."""

    stage: int  # 0-based index into model.layers
    block: int  # 0-based index into that stage's blocks
    decomposed: bool
    query: tuple[int, int]  # (row, col) token of this stage's grid
    weights: torch.Tensor  # (heads, h, w), float64; each head sums to 1

    @property
    def mean(self) -> torch.Tensor:
        """The heads' average ``(h, w)``."""
        return self.weights.mean(0)

    def summary(self) -> dict[str, Any]:
        mean = self.mean
        h, w = mean.shape
        peak = int(mean.argmax())
        rows = torch.arange(h, dtype=torch.float64)[:, None]
        cols = torch.arange(w, dtype=torch.float64)[None, :]
        distance = (rows - self.query[0]).abs() + (cols - self.query[1]).abs()
        return {"stage": self.stage + 1, "block": self.block, "decomposed": self.decomposed, "grid": [h, w],
                    "heads": int(self.weights.shape[0]), "query": list(self.query), "peak": float(mean.max()),
                    "peak_at": [peak // w, peak % w], "mean_distance": float((mean * distance).sum())}


def _query_token(query: tuple[float, float], h: int, w: int) -> tuple[int, int]:
    return min(int(query[0] * h), h - 1), min(int(query[1] * w), w - 1)


def _check_query(query: tuple[float, float]) -> None:
    if not all(0.0 <= v <= 1.0 for v in query):
        raise RMTError(f"--query takes fractions of the image height and width in [0, 1], got {list(query)}")


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor, query: tuple[float, float] = (0.5, 0.5),
                   block: int = -1) -> list[StageAttention]:
    """The MaSA attention of one query point in block ``block`` of every stage.

    ``images``: one preprocessed image ``(1, 3, H, W)``. ``query``: ``(row, col)`` as fractions of
    the image height and width (``(0.5, 0.5)`` is the centre); each stage uses the token that
    contains that point. ``block``: index into each stage's blocks (negative counts from the end).
    """
    _check_query(query)
    stages = _stages(model)
    captured: dict[int, tuple[torch.Tensor, MaSATables]] = {}
    handles = []
    chosen = []
    for i, stage in enumerate(stages):
        depth = len(stage.blocks)
        if not -depth <= block < depth:
            raise RMTError(f"--block {block}: stage {i + 1} has {depth} block(s)")
        j = block % depth
        chosen.append(j)

        def hook(module, args, kwargs, i=i):
            # MaSA.forward(x, tables, ...): take them whether the block passes them by position or name
            inputs = dict(zip(("x", "tables"), args), **kwargs)
            captured[i] = (inputs["x"].detach(), inputs["tables"])

        handles.append(stage.blocks[j].retention.register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        model.forward_features(images[:1])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    result = []
    for i, stage in enumerate(stages):
        x, tables = captured[i]
        token = _query_token(query, x.shape[1], x.shape[2])
        masa = stage.blocks[chosen[i]].retention
        result.append(StageAttention(i, chosen[i], masa.decomposed, token,
                                     masa.query_weights(x, tables, token).cpu()))
    return result


def grad_cam(model: nn.Module, images: torch.Tensor, class_index: int | None = None) -> tuple[torch.Tensor, int]:
    """Grad-CAM of class ``class_index`` (default: the predicted one) on the last stage's features.

    Returns ``(cam, class_index)`` with ``cam`` of the last stage's grid ``(h, w)``, in ``[0, 1]``
    (all zeros when no location has positive evidence).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # the gradient is taken with respect to the features, not through the trunk
            features = model.forward_features(images[:1])
        with torch.enable_grad():
            features = features.detach().requires_grad_(True)
            logits = model.forward_head(features)
            if class_index is None:
                class_index = int(logits[0].argmax())
            (grad,) = torch.autograd.grad(logits[0, class_index], features)
    finally:
        model.train(was_training)
    weights = grad[0].mean(dim=(1, 2))  # (C,)
    cam = torch.relu(torch.einsum("c,chw->hw", weights, features[0].detach())).double()
    top = cam.max()
    return (cam / top if top > 0 else cam), int(class_index)


def denormalise(tensor: torch.Tensor, data_config: dict[str, Any]) -> np.ndarray:
    """A normalised image ``(3, H, W)`` back to ``(H, W, 3)`` in ``[0, 1]`` for drawing."""
    mean = torch.tensor(data_config["mean"], dtype=tensor.dtype)[:, None, None]
    std = torch.tensor(data_config["std"], dtype=tensor.dtype)[:, None, None]
    return (tensor.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def short_label(label: str, width: int = 26) -> str:
    """A class name short enough for a panel title (ImageNet's list several synonyms)."""
    return textwrap.shorten(label, width=width, placeholder="...")


def _overlay(ax, picture: np.ndarray, heat: np.ndarray, title: str, marker: tuple[float, float] | None) -> None:
    height, width = picture.shape[:2]
    extent = (0, width, height, 0)
    ax.imshow(picture, extent=extent)
    top = heat.max()
    ax.imshow(heat / top if top > 0 else heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, extent=extent,
              interpolation="nearest")
    if marker is not None:
        ax.plot([marker[1]], [marker[0]], "o", ms=7, mfc="white", mec="black", mew=1.5)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def figure_image(fig, dpi: int = 100) -> Image.Image:
    """Render a figure to an RGB picture (what a web page shows)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def attention_figure(picture: np.ndarray, stages: Sequence[StageAttention], query: tuple[float, float],
                     caption: str, extra_panels: int = 0):
    """The input with the query point marked, then each stage's attention (the heads' mean) over it.

    ``picture``: the model's input ``(H, W, 3)`` in ``[0, 1]``; ``query``: fractions of its height and
    width; ``extra_panels`` blank panels are added at the end. Returns ``(figure, axes)``.
    """
    height, width = picture.shape[:2]
    marker = (query[0] * height, query[1] * width)
    panels = 1 + len(stages) + extra_panels
    fig = _figure(3.0 * panels, 3.6)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(picture)
    axes[0].plot([marker[1]], [marker[0]], "o", ms=7, mfc="white", mec="black", mew=1.5)
    axes[0].set_title(f"input {height}x{width}, query (white)\n{caption}", fontsize=9)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    for ax, att in zip(axes[1:], stages):
        h, w = att.mean.shape
        kind = "decomposed" if att.decomposed else "full"
        _overlay(ax, picture, att.mean.numpy(), f"stage {att.stage + 1}, {kind} MaSA, block {att.block + 1}\n"
                 f"{h}x{w} tokens, mean of {att.weights.shape[0]} heads", marker)
    return fig, axes


def heads_figure(picture: np.ndarray, attention: StageAttention, decay: torch.Tensor, gammas: Sequence[float],
                 query: tuple[float, float]):
    """One stage, head by head, over ``picture``: the decay ``gamma_t ** d`` around the query token
    (``decay``: ``(heads, h, w)`` on the stage's grid, :func:`decay_maps`) in the first row and the
    head's attention of the query in the second. Returns the figure."""
    height, width = picture.shape[:2]
    marker = (query[0] * height, query[1] * width)
    heads = attention.weights.shape[0]
    columns = min(heads, 8)
    rows = 2 * math.ceil(heads / columns)
    fig = _figure(1.9 * columns + 0.4, 2.05 * rows + 0.5)
    axes = fig.subplots(rows, columns, squeeze=False)
    for t in range(columns * rows // 2):
        pair = (axes[2 * (t // columns)][t % columns], axes[2 * (t // columns) + 1][t % columns])
        if t >= heads:
            for ax in pair:
                ax.set_axis_off()
            continue
        _overlay(pair[0], picture, decay[t].numpy(), f"head {t}: decay \u03b3={gammas[t]:.3f}", marker)
        _overlay(pair[1], picture, attention.weights[t].numpy(), f"head {t}: attention", marker)
        for ax in pair:
            ax.title.set_fontsize(8)
    h, w = attention.mean.shape
    kind = "decomposed" if attention.decomposed else "full"
    fig.suptitle(f"stage {attention.stage + 1} ({kind} MaSA, block {attention.block + 1}, {h}x{w} tokens): "
                 f"decay \u03b3$_t^{{d}}$ and attention of query token {attention.query}, per head", fontsize=10)
    return fig


def plot_attention(classifier, image, output: str | os.PathLike, query: tuple[float, float] = (0.5, 0.5),
                   block: int = -1, cam: bool = False, title: str | None = None, dpi: int = 110) -> dict[str, Any]:
    """Draw the attention of ``query`` per stage (and Grad-CAM) over ``image`` as the model sees it.

    ``classifier``: a :class:`rmt.runtime.classifier.Classifier`; ``image``: a file path or a PIL image.
    The picture is the model's input (after its resize and crop). Returns what was drawn: the
    prediction, per-stage summaries (:meth:`StageAttention.summary`) and the Grad-CAM class.
    """
    tensor = classifier.preprocess(classifier.read(image))
    images = tensor[None].to(classifier.device)
    stages = attention_maps(classifier.model, images, query, block)
    probs = classifier.probabilities(images)[0]
    best = classifier.top(probs, 1)[0]
    picture = denormalise(tensor, classifier.data_config)
    height, width = picture.shape[:2]
    caption = f"predicted: {short_label(best['label'])} ({best['prob']:.1%})"
    fig, axes = attention_figure(picture, stages, query, caption, extra_panels=int(cam))
    result: dict[str, Any] = {"prediction": best, "stages": [s.summary() for s in stages],
                              "input_size": [height, width]}
    if cam:
        heat, index = grad_cam(classifier.model, images)
        label = classifier.class_names[index]
        _overlay(axes[-1], picture, heat.numpy(), f"Grad-CAM: {short_label(label)}\n({heat.shape[0]}x{heat.shape[1]}, "
                 "last stage)", None)
        result["cam"] = {"index": index, "label": label, "grid": list(heat.shape)}
    fig.suptitle(title or "MaSA attention of the query point (weights scaled to each panel's maximum)", fontsize=11)
    result["output"] = str(_save(fig, output, dpi))
    return result


# ------------------------------------------------------------------------------- file-level API
def _check_dpi(dpi: int) -> None:
    if not 10 <= dpi <= 600:
        raise RMTError(f"--dpi must be between 10 and 600, got {dpi}")


def _build(model: str | nn.Module | None, checkpoint: str | os.PathLike | None) -> nn.Module:
    from ..models.factory import checkpoint_info, create_model

    if isinstance(model, nn.Module):
        return model
    name = model
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise RMTError(f"checkpoint not found: {checkpoint}")
        name = name or checkpoint_info(checkpoint).get("model")
    if name is None:
        raise RMTError("pass --model (rmt_t, rmt_s, ...)")
    return create_model(name, checkpoint=checkpoint)


def visualize_decay(model: str | nn.Module | None, output: str | os.PathLike,
                    checkpoint: str | os.PathLike | None = None, grid: int = 21,
                    dpi: int = 110) -> dict[str, Any]:
    """``rmt visualize decay``: draw the decay of every head of every stage; returns
    ``{"output", "stages": decay_summary(...)}``. The decay depends only on the variant, so the
    checkpoint is optional (its ``relpos.decay`` buffers are used when given)."""
    if grid < 1:
        raise RMTError(f"--grid must be positive, got {grid}")
    _check_dpi(dpi)
    net = _build(model, checkpoint)
    path = plot_decay(net, output, (grid, grid), dpi=dpi)
    return {"output": str(path), "stages": decay_summary(net)}


def visualize_attention(image: str | os.PathLike, model: str | nn.Module | None,
                        output: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                        query: tuple[float, float] = (0.5, 0.5), block: int = -1, img_size: int | None = None,
                        cam: bool = False, device: str = "auto", dpi: int = 110) -> dict[str, Any]:
    """``rmt visualize attention``: load the model, read ``image``, draw :func:`plot_attention`.

    ``img_size`` replaces the model's input size (the picture is sharper; MaSA works at any size).
    """
    _check_query(query)
    _check_dpi(dpi)
    classifier = load_classifier(model, checkpoint, device, amp="none")  # pictures of the float32 model
    if img_size is not None:
        if img_size < 1:
            raise RMTError(f"--img-size must be positive, got {img_size}")
        config = dict(classifier.data_config, input_size=[classifier.data_config["input_size"][0], img_size, img_size])
        classifier = Classifier(classifier.model, config, classifier.class_names, classifier.device, amp="none")
    try:
        return plot_attention(classifier, image, output, query=query, block=block, cam=cam, dpi=dpi)
    except BadImageError as e:
        raise RMTError(f"cannot read {e}") from e
