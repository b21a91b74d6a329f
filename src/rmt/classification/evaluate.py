"""``rmt eval``: top-1 / top-5 accuracy and cross-entropy of a checkpoint (ours or official) on an image
folder or the digits test split (measured by :func:`rmt.runtime.accuracy.evaluate`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

from ..data import DigitsDataset, ImageFolderDataset, eval_transform
from ..errors import RMTError
from ..models.factory import checkpoint_info, create_model, find_checkpoint, split_name
from ..runtime.accuracy import eval_loader, evaluate
from ..runtime.precision import amp_dtype, describe_precision
from ..runtime.processes import resolve_device

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(model_name: Optional[str], checkpoint: str | os.PathLike, data: Optional[str] = None,
                        split: str = "val", batch_size: int = 64, workers: int = 4, device: str = "auto",
                        amp: str = "none", progress: bool = True) -> Dict[str, Any]:
    """Evaluate a checkpoint (ours or official) on an image folder, or on the digits test split.

    ``data`` is an ImageNet-style root (``DATA/<split>/<class>/*``) or a split folder itself. The
    checkpoint's class names (ours) map folder names to outputs; without them (official weights)
    the sorted folder names are the class indices, as ImageNet's synset folders are. Images are
    prepared as the checkpoint's data config says, else as the model's ``pretrained_cfg`` (bicubic
    resize to 256, 224 centre crop for the official models). ``amp``: ``none`` (float32, the
    default: reproducing published accuracy), ``bf16`` or ``fp16``. The result says which
    (``precision``).
    """
    if model_name is not None:
        split_name(model_name)  # a wrong name is reported before any file is read
    if batch_size < 1:
        raise RMTError(f"--batch-size must be positive, got {batch_size}")
    checkpoint = find_checkpoint(checkpoint)
    info = checkpoint_info(checkpoint)
    model_name = model_name or info.get("model")
    if model_name is None:
        raise RMTError(f"{checkpoint} does not name its model: pass --model (rmt_t, rmt_s, ...)")
    torch_device = resolve_device(device)
    dtype = amp_dtype(amp, torch_device)
    model = create_model(model_name, checkpoint=checkpoint).to(torch_device)
    class_names = info.get("class_names")
    data_config = info.get("data_config")
    if data_config is None:
        cfg = model.pretrained_cfg
        data_config = dict(input_size=list(cfg["input_size"]), mean=list(cfg["mean"]), std=list(cfg["std"]),
                           interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"])
    if data is None:
        if class_names != DigitsDataset.classes:
            raise RMTError("this checkpoint was not trained on the bundled digits: pass --data DIR")
        dataset = DigitsDataset("test", img_size=data_config["input_size"][-1])
    else:
        root = Path(data)
        root = root / split if (root / split).is_dir() else root
        dataset = ImageFolderDataset(root, transform=eval_transform(data_config), classes=class_names)
        if class_names is None and len(dataset.classes) != model.num_classes:
            raise RMTError(f"{root} has {len(dataset.classes)} class folders, the model {model.num_classes} outputs")
    if len(dataset) == 0:
        raise RMTError(f"{data} has no images to evaluate")
    loader = eval_loader(dataset, batch_size, workers if data is not None else 0,
                         pin_memory=torch_device.type == "cuda")
    result = evaluate(model, loader, torch_device, amp=dtype, progress=progress)
    return dict(result, model=model_name, checkpoint=str(checkpoint),
                precision=describe_precision(torch_device, dtype))
