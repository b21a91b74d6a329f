"""The detectors' input transform: the official pipeline per image, batched, ground truth following the image."""
import numpy as np
import torch
from PIL import Image

from dense_golden import DENSE, load_dense_golden
from rmt.detection.transform import DetectionTransform


def golden_image(name: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(DENSE / name).convert("RGB"))).permute(2, 0, 1) / 255


def test_eval_batch_is_the_official_input():
    """Each image of a batch equals the official network input (resized, normalised, padded to 32); the
    batch is padded to its largest image with zeros, as mmdet's collate pads."""
    golden = load_dense_golden("maskrcnn_t")["images"]
    names = ["img_wide.png", "img_tall.png"]
    batch, _ = DetectionTransform().eval()([golden_image(n) for n in names])
    assert list(batch.tensors.shape) == [2, 3, 1216, 1088]
    for i, name in enumerate(names):
        meta, ref = golden[name]["meta"], golden[name]["input"]
        h, w = ref["shape"][2:]
        own = batch.tensors[i, :, :h, :w].double()
        assert own.flatten()[: len(ref["first"])].tolist() == ref["first"]
        assert own.flatten()[ref["sample_index"]].tolist() == ref["sample"]
        assert abs(own.sum().item() - ref["sum"]) <= 1e-9 * ref["abs_sum"]
        assert batch.tensors[i, :, h:].abs().sum() == 0 and batch.tensors[i, :, :, w:].abs().sum() == 0
        assert list(batch.metas[i].img_shape) == meta["img_shape"][:2] == list(batch.image_sizes[i])
        assert batch.metas[i].scale_factor.tolist() == meta["scale_factor"]


def test_targets_follow_the_image():
    image = torch.zeros(3, 40, 60)
    masks = torch.zeros(1, 40, 60, dtype=torch.uint8)
    masks[0, 10:20, 30:60] = 1
    target = {"boxes": torch.tensor([[30.0, 10.0, 60.0, 20.0]]), "labels": torch.tensor([1]), "masks": masks}
    transform = DetectionTransform(min_sizes=(80,), max_size=1000).train()
    batch, (out,) = transform([image], [target])
    assert batch.image_sizes == [(80, 120)] and list(batch.tensors.shape) == [1, 3, 96, 128]
    assert out["boxes"].tolist() == [[60.0, 20.0, 120.0, 40.0]]
    assert out["masks"].shape == (1, 80, 120) and out["masks"].dtype == torch.uint8
    assert out["masks"].sum().item() == 4 * masks.sum().item()
    assert torch.equal(out["labels"], target["labels"])


def test_training_draws_the_short_side_per_image():
    transform = DetectionTransform(min_sizes=(32, 64), max_size=1000).train()
    torch.manual_seed(0)
    sizes = {transform([torch.zeros(3, 16, 16)])[0].image_sizes[0] for _ in range(20)}
    assert sizes == {(32, 32), (64, 64)}
    assert transform.eval()([torch.zeros(3, 16, 16)])[0].image_sizes == [(64, 64)]
