"""Generate the dense (detection / segmentation) golden data from the OFFICIAL RMT code.

This script is not part of the test suite and does not run in the project's environment: it imports
the official repository's vendored mmdet 2.11 / mmseg 0.13 (qhfan/RMT, folders ``detect/`` and
``segmentation/``), which need mmcv 1.x. The official code is never committed here; only this
script and what it writes are.

Environment (what produced the committed data)::

    python -m venv --system-site-packages /work/venv-mm        # reuses the system torch 2.14.1 (CPU use)
    /work/venv-mm/bin/pip install "setuptools<70" wheel
    MMCV_WITH_OPS=0 /work/venv-mm/bin/pip install --no-build-isolation "mmcv<2"    # 1.7.2, pure Python
    /work/venv-mm/bin/pip install "mmdet<3" "mmsegmentation<1"  # 2.28.2 / 0.30.0: only for their dependencies
    mkdir -p /work/rmt-official && cd /work/rmt-official && \\
        git --git-dir=<mirror of github.com/qhfan/RMT> archive 32ea21417a4d82ba6481f930f94cb4696dda0a8e \\
        detect segmentation | tar x

Run (from the repository root; about half an hour on 2 shared CPU cores)::

    /work/venv-mm/bin/python tests/data/dense_golden/make_goldens.py --official /work/rmt-official

The official ``detect/`` (resp. ``segmentation/``) folder is put first on ``sys.path``, so ``import mmdet``
(resp. ``mmseg``) is the VENDORED 2.11.0 (resp. 0.13.0) code the paper's models were trained and tested with,
not the pip-installed 2.28.2 / 0.30.0. Detection and segmentation run in separate subprocesses (both vendored
trees have their own ``mmcv_custom`` package).

Two stand-ins make the vendored code import without mmcv's compiled ops (see ``install_shims``):
``mmcv._ext`` (every op a stub that raises, except ``nms`` and ``roi_align_forward``) and the backbone modules
that ``__init__`` files import but the release does not ship (``efficientvit``). What is written, and the
weight recipe, is described in README.md next to this file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
OFFICIAL_COMMIT = "32ea21417a4d82ba6481f930f94cb4696dda0a8e"
WEIGHT_SEED = 1234
N_FIRST = 16  # leading flat values kept per tensor
N_SAMPLE = 16  # evenly spaced flat values kept per tensor

# Backbone settings of the released configs (detect/configs/RMT/maskrcnn_{t,s}_1x.py, identical in every
# detection and segmentation config of the same variant).
BACKBONES = {
    "t": dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 8, 2], num_heads=[4, 4, 8, 16],
              init_values=[2, 2, 2, 2], heads_ranges=[4, 4, 6, 6], mlp_ratios=[3, 3, 3, 3], drop_path_rate=0.1,
              chunkwise_recurrents=[True, True, False, False], layerscales=[False, False, False, False],
              out_indices=(0, 1, 2, 3)),
    "s": dict(embed_dims=[64, 128, 256, 512], depths=[3, 4, 18, 4], num_heads=[4, 4, 8, 16],
              init_values=[2, 2, 2, 2], heads_ranges=[4, 4, 6, 6], mlp_ratios=[4, 4, 3, 3], drop_path_rate=0.15,
              chunkwise_recurrents=[True, True, True, False], layerscales=[False, False, False, False],
              out_indices=(0, 1, 2, 3)),
}

# (case name, family, official config, variant). Cascade Mask R-CNN and UperNet have no released T config:
# their T cases take the S config with the T backbone above (the neck/head input widths are the same, 64..512).
CASES = [
    ("maskrcnn_t", "det", "detect/configs/RMT/maskrcnn_t_1x.py", "t"),
    ("maskrcnn_s", "det", "detect/configs/RMT/maskrcnn_s_1x.py", "s"),
    ("retinanet_t", "det", "detect/configs/RMT/retinanet_t_1x.py", "t"),
    ("retinanet_s", "det", "detect/configs/RMT/retinanet_s_1x.py", "s"),
    ("casrcnn_t", "det", "detect/configs/RMT/casrcnn_s_3x.py", "t"),
    ("casrcnn_s", "det", "detect/configs/RMT/casrcnn_s_3x.py", "s"),
    ("fpn_t", "seg", "segmentation/configs/RMT/RMT_FPN_t_1x.py", "t"),
    ("fpn_s", "seg", "segmentation/configs/RMT/RMT_FPN_s_1x.py", "s"),
    ("uper_t", "seg", "segmentation/configs/RMT/RMT_Uper_s_2x.py", "t"),
    ("uper_s", "seg", "segmentation/configs/RMT/RMT_Uper_s_2x.py", "s"),
]

# Input images: (file, height, width, seed). Smooth seeded colour fields, saved as PNG (the official test
# pipelines start from LoadImageFromFile, i.e. mmcv.imread: BGR uint8).
IMAGES = [("img_wide.png", 240, 320, 11), ("img_tall.png", 300, 200, 12)]

# Class-score layers get a gain (and RetinaNet's a bias) so that synthetic weights give a moderate number of
# detections above the configs' score_thr (0.05): see README.md "Weights".
CASCADE_CLS = re.compile(r"bbox_head\.\d+\.fc_cls\.weight$")  # the cascade's stages average their logits


def cls_gain(name: str) -> float:
    if CASCADE_CLS.search(name):
        return 3.5
    return 0.5 if name.endswith("fc_cls.weight") else 1.0


CLS_BIAS = {"retina_cls.bias": -math.log((1 - 0.01) / 0.01)}


# ----------------------------------------------------------------------------------------------- shims
def install_shims(family: str) -> None:
    """Stand-ins that let the vendored mmdet/mmseg import on mmcv 1.7.2 built without its compiled ops."""
    import torchvision

    ext = types.ModuleType("mmcv._ext")

    def _missing(name):
        def op(*args, **kwargs):
            raise RuntimeError(f"mmcv._ext.{name}: compiled mmcv op not available in the golden generator")
        return op

    def nms(bboxes, scores, iou_threshold, offset):
        # mmcv 1.7 NMSop.forward calls ext_module.nms(bboxes, scores, iou_threshold=, offset=) and mmdet 2.x's
        # batched_nms / nms never set offset, so offset == 0: box area (x2-x1)*(y2-y1), a box is suppressed when
        # IoU > iou_threshold (strictly) with a kept box of higher score, boxes visited in descending score
        # order; the kept indices are returned in that order. torchvision.ops.nms computes exactly this (same
        # area without +1, same strict '>' test, same descending sort). mmcv's CPU kernel sorts with
        # scores.sort(descending=True) like torchvision; exact score ties are the only place the two could
        # order differently; the generator records ties among the kept detections (score_ties: none).
        if offset != 0:
            raise RuntimeError("nms with offset=1 (legacy mmdet 1.x box convention) is not mapped")
        return torchvision.ops.nms(bboxes, scores, float(iou_threshold))

    def roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height, aligned_width,
                          spatial_scale, sampling_ratio, pool_mode, aligned):
        # mmcv 1.7 RoIAlign (roi_align_cpu/cuda kernels) with pool_mode 'avg' (1): per output bin, a grid of
        # sampling_ratio x sampling_ratio bilinear samples, or ceil(roi_size / output_size) per axis when
        # sampling_ratio == 0 (the configs' value), averaged; roi coordinates times spatial_scale, minus 0.5
        # when aligned (mmdet 2.x default aligned=True), roi size clamped to >= 1 only when not aligned;
        # samples beyond [-1, size] are 0 and coordinates in [-1, 0] clamp to 0. torchvision.ops.roi_align
        # implements the same detectron2 algorithm with the same arguments (rois as (batch_idx, x1, y1, x2,
        # y2)), so the mapping is exact. 'max' pooling has no torchvision twin and is left unmapped.
        if pool_mode != 1:
            raise RuntimeError("roi_align max pooling is not mapped")
        out = torchvision.ops.roi_align(input, rois, (aligned_height, aligned_width), spatial_scale,
                                        sampling_ratio, aligned)
        output.copy_(out)

    def getattr_(name):
        if name.startswith("_"):
            raise AttributeError(name)
        return _missing(name)

    ext.nms = nms
    ext.roi_align_forward = roi_align_forward
    ext.__getattr__ = getattr_
    sys.modules["mmcv._ext"] = ext
    # Imported by the vendored backbones/__init__.py but not shipped in the release.
    pkg = "mmdet" if family == "det" else "mmseg"
    stub = types.ModuleType(f"{pkg}.models.backbones.efficientvit")
    stub.EfficientViT = type("EfficientViT", (torch.nn.Module,), {})
    sys.modules[stub.__name__] = stub


# ---------------------------------------------------------------------------------------------- weights
def key_list(state_dict) -> list:
    keys = []
    for k, v in state_dict.items():
        fixed = v.tolist() if k.endswith(("Relpos.angle", "Relpos.decay")) else None
        keys.append([k, list(v.shape), fixed])
    return keys


def synth_weights(keys) -> dict:
    """The recipe of ../../../../shared/golden (SOURCE.md) plus the class-score gains above."""
    g = torch.Generator().manual_seed(WEIGHT_SEED)
    out = {}
    for name, shape, fixed in keys:
        if fixed is not None:
            t = torch.tensor(fixed, dtype=torch.float32)
        elif name.endswith("num_batches_tracked"):
            t = torch.tensor(0)
        elif name.endswith("running_var"):
            t = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("running_mean"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif "gamma" in name:
            t = 0.5 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
            if name.endswith(("out_proj.weight", "fc2.weight")) or any(s in name for s in (".pos.", ".lepe.",
                                                                                          "dwconv")):
                t = t * 0.2
            gain = cls_gain(name)
            if gain != 1.0:
                t = t * gain
        elif name.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.02 * torch.randn(shape, generator=g)
            for suffix, bias in CLS_BIAS.items():
                if name.endswith(suffix):
                    t = t + bias
        out[name] = t
    return out


# ------------------------------------------------------------------------------------------- summaries
def summary(t: torch.Tensor) -> dict:
    t = t.detach().to(torch.float64)
    flat = t.flatten()
    n = flat.numel()
    idx = torch.linspace(0, n - 1, N_SAMPLE).round().long() if n else torch.zeros(0, dtype=torch.long)
    return {"shape": list(t.shape), "sum": float(flat.sum()), "abs_sum": float(flat.abs().sum()),
            "first": flat[:N_FIRST].tolist(), "sample_index": idx.tolist(), "sample": flat[idx].tolist()}


def summarise(obj):
    if isinstance(obj, torch.Tensor):
        return summary(obj)
    if isinstance(obj, (list, tuple)):
        return [summarise(o) for o in obj]
    if isinstance(obj, dict):
        return {k: summarise(v) for k, v in obj.items()}
    return None


def make_images(folder: Path) -> None:
    import cv2

    for fname, h, w, seed in IMAGES:
        g = torch.Generator().manual_seed(seed)
        low = torch.rand(1, 3, 6, 8, generator=g) * 255
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
        fine = torch.rand(1, 3, h // 10, w // 10, generator=g) * 60 - 30
        img = img + torch.nn.functional.interpolate(fine, size=(h, w), mode="bilinear", align_corners=False)
        rgb = img.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
        cv2.imwrite(str(folder / fname), rgb[:, :, ::-1].copy())  # PNG holds RGB; the array given is BGR


class _Restore:
    """Undo a wrapped method on .remove() (the same interface as a hook handle)."""

    def __init__(self, obj, attr):
        self.obj, self.attr = obj, attr

    def remove(self):
        delattr(self.obj, self.attr)


def hook_calls(modules: dict, record: dict) -> list:
    handles = []
    for name, mod in modules.items():
        if mod is None:
            continue
        record[name] = []
        if hasattr(mod, "forward_test") and name in ("decode_head", "auxiliary_head"):
            # mmseg calls decode_head.forward_test(), which calls self.forward() directly: no hooks fire
            def wrapped(*args, _orig=mod.forward_test, _name=name, **kwargs):
                out = _orig(*args, **kwargs)
                record[_name].append(summarise(out))
                return out
            mod.forward_test = wrapped
            handles.append(_Restore(mod, "forward_test"))
            continue

        def fn(m, inp, out, name=name):
            record[name].append(summarise(out))
        handles.append(mod.register_forward_hook(fn))
    return handles


def build_cfg(cfg_path: Path, variant: str):
    from mmcv import Config

    text = cfg_path.read_text()
    if "//(gpu_multipliers//2)" in text:
        # RMT_Uper_*_2x.py computes warmup_iters = 1500//(gpu_multipliers//2) with gpu_multipliers = 1, a
        # division by zero when mmcv executes the file; the training-only setting gets gpu_multipliers 2
        # (the model, test pipeline and test_cfg do not depend on it).
        patched = cfg_path.with_name(f"_golden_{cfg_path.name}")
        patched.write_text(text.replace("1500//(gpu_multipliers//2)", "1500//max(1, gpu_multipliers//2)"))
        try:
            cfg = Config.fromfile(str(patched))
        finally:
            patched.unlink()
    else:
        cfg = Config.fromfile(str(cfg_path))
    cfg.model.backbone.update(BACKBONES[variant])
    cfg.model.pretrained = None
    return cfg


def rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}


# ------------------------------------------------------------------------------------------- detection
def run_det(name, cfg_path, variant, out_dir: Path) -> dict:
    from mmdet.apis import inference_detector, init_detector
    from mmdet.datasets import CocoDataset

    cfg = build_cfg(cfg_path, variant)
    model = init_detector(cfg, checkpoint=None, device="cpu")
    model.CLASSES = CocoDataset.CLASSES  # what a released checkpoint's meta sets
    keys = key_list(model.state_dict())
    model.load_state_dict(synth_weights(keys), strict=True)
    model.eval()
    mods = {"backbone": model.backbone, "neck": model.neck}
    for attr in ("rpn_head", "bbox_head"):
        if hasattr(model, attr):
            mods[attr] = getattr(model, attr)
    roi = getattr(model, "roi_head", None)
    if roi is not None:
        for attr in ("bbox_head", "mask_head"):
            heads = getattr(roi, attr, None)
            if isinstance(heads, torch.nn.ModuleList):
                for i, h in enumerate(heads):
                    mods[f"roi_head.{attr}.{i}"] = h
            elif heads is not None:
                mods[f"roi_head.{attr}"] = heads
    case = {"name": name, "family": "det", "config": cfg_path.relative_to(cfg_path.parents[3]).as_posix(),
            "variant": variant, "detector": type(model).__name__, "config_text": cfg.pretty_text,
            "keys": keys, "classes": list(model.CLASSES), "images": {}}
    for fname, *_ in IMAGES:
        record = {}
        inputs = {}

        def pre(m, args):
            inputs["img"] = summary(args[0])
        handles = hook_calls(mods, record) + [model.backbone.register_forward_pre_hook(pre)]
        meta = {}
        orig = model.simple_test

        def simple_test(img, img_metas, *a, **k):
            meta.update({k2: (list(v) if isinstance(v, (tuple, np.ndarray)) else v)
                         for k2, v in img_metas[0].items() if k2 in ("ori_shape", "img_shape", "pad_shape",
                                                                     "scale_factor", "flip", "flip_direction")})
            meta["input_shape"] = list(img.shape)
            return orig(img, img_metas, *a, **k)
        model.simple_test = simple_test
        with torch.no_grad():
            result = inference_detector(model, str(out_dir / fname))
        model.simple_test = orig
        for h in handles:
            h.remove()
        bbox_res, segm_res = result if isinstance(result, tuple) else (result, None)
        dets, masks = [], []
        for label, arr in enumerate(bbox_res):
            for j, row in enumerate(arr):
                dets.append([float(x) for x in row[:4]] + [float(row[4]), label])
                if segm_res is not None:
                    masks.append(rle(segm_res[label][j]))
        scores = sorted(d[4] for d in dets)
        ties = sum(1 for a, b in zip(scores, scores[1:]) if a == b)
        case["images"][fname] = {"meta": {k: [float(x) for x in v] if isinstance(v, list) else v
                                          for k, v in meta.items()},
                                 "input": inputs["img"], "calls": record, "detections": dets, "masks": masks,
                                 "score_ties": ties}
        print(f"{name} {fname}: input {meta['input_shape']} -> {len(dets)} detections", flush=True)
    return case


# ---------------------------------------------------------------------------------------- segmentation
def run_seg(name, cfg_path, variant, out_dir: Path) -> dict:
    from mmseg.apis import inference_segmentor, init_segmentor
    from mmseg.datasets import ADE20KDataset
    from PIL import Image

    cfg = build_cfg(cfg_path, variant)
    model = init_segmentor(cfg, checkpoint=None, device="cpu")
    model.CLASSES = ADE20KDataset.CLASSES
    keys = key_list(model.state_dict())
    model.load_state_dict(synth_weights(keys), strict=True)
    model.eval()
    mods = {"backbone": model.backbone, "neck": getattr(model, "neck", None), "decode_head": model.decode_head,
            "auxiliary_head": getattr(model, "auxiliary_head", None)}
    case = {"name": name, "family": "seg", "config": cfg_path.relative_to(cfg_path.parents[3]).as_posix(),
            "variant": variant, "segmentor": type(model).__name__, "config_text": cfg.pretty_text,
            "keys": keys, "classes": list(model.CLASSES), "images": {}}
    for fname, *_ in IMAGES:
        record, inputs, meta = {}, {}, {}

        def pre(m, args):
            inputs["img"] = summary(args[0])
        handles = hook_calls(mods, record) + [model.backbone.register_forward_pre_hook(pre)]
        orig = model.inference

        def inference(img, img_meta, rescale):
            meta.update({k2: (list(v) if isinstance(v, (tuple, np.ndarray)) else v)
                         for k2, v in img_meta[0].items() if k2 in ("ori_shape", "img_shape", "pad_shape",
                                                                    "scale_factor", "flip", "flip_direction")})
            meta["input_shape"] = list(img.shape)
            logit = orig(img, img_meta, rescale)
            inputs["seg_logit"] = summary(logit)
            return logit
        model.inference = inference
        with torch.no_grad():
            result = inference_segmentor(model, str(out_dir / fname))
        model.inference = orig
        for h in handles:
            h.remove()
        seg = result[0].astype(np.uint8)
        png = f"{name}_{Path(fname).stem}_seg.png"
        Image.fromarray(seg).save(out_dir / png)
        case["images"][fname] = {"meta": {k: [float(x) for x in v] if isinstance(v, list) else v
                                          for k, v in meta.items()},
                                 "input": inputs["img"], "calls": record, "seg_logit": inputs["seg_logit"],
                                 "seg_png": png, "seg_hist": np.bincount(seg.ravel(), minlength=150).tolist()}
        print(f"{name} {fname}: input {meta['input_shape']} -> classes {len(np.unique(seg))}", flush=True)
    return case


# ------------------------------------------------------------------------------------------- backbone
def run_backbone(variant: str) -> dict:
    from mmdet.models import build_backbone

    cfg = dict(type="RMT", **BACKBONES[variant])
    model = build_backbone(cfg)
    keys = [["backbone." + k, s, f] for k, s, f in key_list(model.state_dict())]
    w = synth_weights(keys)
    model.load_state_dict({k[len("backbone."):]: v for k, v in w.items()}, strict=True)
    case = {"name": f"backbone_{variant}", "variant": variant, "settings": BACKBONES[variant], "keys": keys}
    x = torch.randn((1, 3, 64, 96), generator=torch.Generator().manual_seed(21))
    model.eval()
    with torch.no_grad():
        case["eval"] = {"input_shape": [1, 3, 64, 96], "input_seed": 21, "outputs": summarise(model(x))}
    # Train mode: norm_eval=True (the class default) only calls .eval() on nn.BatchNorm2d instances, and the
    # backbone's norms are nn.SyncBatchNorm (not a BatchNorm2d subclass): they stay in training mode, use the
    # batch statistics and update their running buffers. Drop path is random, so it is switched off here.
    for m in model.modules():
        if type(m).__name__ == "DropPath":
            m.drop_prob = 0.0
    model.train()
    modes = {type(m).__name__ + ":" + str(m.training) for m in model.modules() if "Norm" in type(m).__name__}
    x2 = torch.randn((2, 3, 64, 96), generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        outs = model(x2)
    running = {k: summary(v) for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var",
                                                                                  "num_batches_tracked"))}
    case["train"] = {"input_shape": [2, 3, 64, 96], "input_seed": 22, "drop_path": 0.0,
                     "norm_modes": sorted(modes), "outputs": summarise(outs), "buffers_after": running}
    print(f"backbone_{variant}: norms in train mode {sorted(modes)}", flush=True)
    return case


# Pipeline-free cases: a seeded tensor given to the model as if the pipeline had produced it, with
# hand-written image metas (the input is 1.28x the "original" image). They test the networks and their
# post-processing without the image resizing.
TENSOR_INPUT = {"det": ((1, 3, 128, 160), 31, (100, 125, 3)), "seg": ((1, 3, 96, 128), 32, (75, 100, 3))}


def run_tensor(name, family, cfg_path, variant) -> dict:
    shape, seed, ori = TENSOR_INPUT[family]
    cfg = build_cfg(cfg_path, variant)
    if family == "det":
        from mmdet.apis import init_detector
        model = init_detector(cfg, checkpoint=None, device="cpu")
    else:
        from mmseg.apis import init_segmentor
        model = init_segmentor(cfg, checkpoint=None, device="cpu")
    keys = key_list(model.state_dict())
    model.load_state_dict(synth_weights(keys), strict=True)
    model.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    h, w = shape[2:]
    sf = np.array([w / ori[1], h / ori[0], w / ori[1], h / ori[0]], dtype=np.float32)
    meta = dict(ori_shape=ori, img_shape=(h, w, 3), pad_shape=(h, w, 3), scale_factor=sf, flip=False,
                flip_direction=None, filename=None, ori_filename=None)
    mods = {"backbone": model.backbone, "neck": getattr(model, "neck", None)}
    for attr in ("rpn_head", "bbox_head", "decode_head"):
        if getattr(model, attr, None) is not None:
            mods[attr] = getattr(model, attr)
    roi = getattr(model, "roi_head", None)
    if roi is not None:
        for attr in ("bbox_head", "mask_head"):
            heads = getattr(roi, attr, None)
            if isinstance(heads, torch.nn.ModuleList):
                for i, hd in enumerate(heads):
                    mods[f"roi_head.{attr}.{i}"] = hd
            elif heads is not None:
                mods[f"roi_head.{attr}"] = heads
    record = {}
    handles = hook_calls(mods, record)
    case = {"name": f"{name}_tensor", "family": family, "variant": variant,
            "config": cfg_path.relative_to(cfg_path.parents[3]).as_posix(), "input_shape": list(shape),
            "input_seed": seed, "meta": {"ori_shape": list(ori), "img_shape": [h, w, 3],
                                         "scale_factor": [float(v) for v in sf]}, "keys": keys}
    with torch.no_grad():
        if family == "det":
            result = model.simple_test(x, [meta], rescale=True)[0]
            bbox_res, segm_res = result if isinstance(result, tuple) else (result, None)
            dets, masks = [], []
            for label, arr in enumerate(bbox_res):
                for j, row in enumerate(arr):
                    dets.append([float(v) for v in row[:4]] + [float(row[4]), label])
                    if segm_res is not None:
                        masks.append(rle(segm_res[label][j]))
            case.update(detections=dets, masks=masks)
            print(f"{name}_tensor: {len(dets)} detections", flush=True)
        else:
            prob = model.inference(x, [meta], rescale=True)
            seg = prob.argmax(1)[0].to(torch.uint8).numpy()
            case.update(seg_prob=summary(prob), seg_shape=list(seg.shape), seg=seg.ravel().tolist())
            print(f"{name}_tensor: classes {len(np.unique(seg))}", flush=True)
    for hd in handles:
        hd.remove()
    case["calls"] = record
    return case


def write(case: dict, out_dir: Path) -> None:
    with gzip.GzipFile(out_dir / f"{case['name']}.json.gz", "wb", mtime=0) as f:
        f.write(json.dumps(case, separators=(",", ":")).encode())


def run_family(family: str, official: Path, out_dir: Path, only: list) -> None:
    sys.path.insert(0, str(official / ("detect" if family == "det" else "segmentation")))
    install_shims(family)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if family == "det":
        import mmdet
        assert mmdet.__version__ == "2.11.0", mmdet.__file__
        for v in ("t", "s"):
            if not only or f"backbone_{v}" in only:
                write(run_backbone(v), out_dir)
    else:
        import mmseg
        assert mmseg.__version__ == "0.13.0", mmseg.__file__
    for name, fam, cfg, variant in CASES:
        if fam != family:
            continue
        if not only or f"{name}_tensor" in only:
            write(run_tensor(name, family, official / cfg, variant), out_dir)
        if not only or name in only:
            write((run_det if family == "det" else run_seg)(name, official / cfg, variant, out_dir), out_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", type=Path, required=True, help="folder holding the official detect/, segmentation/")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--family", choices=["det", "seg"], help="internal: run one family in this process")
    p.add_argument("--only", nargs="*", default=[], help="case names (default: all)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.family:
        run_family(args.family, args.official.resolve(), args.out, args.only)
        return
    make_images(args.out)
    for family in ("det", "seg"):
        cmd = [sys.executable, __file__, "--official", str(args.official), "--out", str(args.out),
               "--family", family, "--only", *args.only]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
