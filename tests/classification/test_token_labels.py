"""Token labelling: label files, joint augmentation, label generation, the loss and a training run."""
import random

import pytest
import torch
from PIL import Image

from rmt.classification import ClassificationConfig, train
from rmt.classification.losses import TokenLabelLoss
from rmt.cli import main
from rmt.data.token_label import (
    JointRandAugment,
    TokenLabelDataset,
    dense_logits,
    label_path,
    read_label_map,
    token_targets,
    write_label_map,
)
from rmt.errors import RMTError
from rmt.training import load_config, read_run_checkpoint


def _two_colour_folder(root, n=4, size=(96, 96)):
    """train/<cls>/ images whose left half is red and right half blue; labels: class 0 left, 1 right."""
    labels = root / "labels"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = torch.zeros(*size, 3, dtype=torch.uint8)
                pixels[:, : size[1] // 2, 0] = 255
                pixels[:, size[1] // 2:, 2] = 255
                path = folder / f"{cls}{i}.png"
                Image.fromarray(pixels.numpy()).save(path)
                if split == "train":
                    scores = torch.tensor([10.0, 0.0]).view(2, 1, 1).repeat(1, 6, 6)  # top-2 of 2 classes
                    indices = torch.tensor([0.0, 1.0]).view(2, 1, 1).repeat(1, 6, 6)
                    indices[0, :, 3:], indices[1, :, 3:] = 1, 0  # top-1 is class 1 on the right half
                    write_label_map(label_path(labels, path), scores, indices)
    return root, labels


def test_label_files_round_trip(tmp_path):
    scores = torch.rand(5, 3, 4)
    indices = torch.stack([torch.randperm(7)[:5] for _ in range(12)], -1).view(5, 3, 4).float()  # distinct top-5
    path = label_path(tmp_path, "/data/train/n01/img_1.JPEG")
    assert path == tmp_path / "n01" / "img_1.pt"
    write_label_map(path, scores, indices)
    raw = torch.load(path, weights_only=True)
    assert raw.dtype == torch.float16 and raw.shape == (2, 5, 3, 4)
    label = read_label_map(path)
    dense = dense_logits(label, 7)
    assert dense.shape == (7, 3, 4)
    assert torch.allclose(dense.gather(0, indices.long()), scores.half().float())
    with pytest.raises(RMTError, match="out of range"):
        dense_logits(label, 3)


def test_joint_augmentation_keeps_labels_on_their_pixels(tmp_path, monkeypatch):
    root, labels = _two_colour_folder(tmp_path, n=1)
    monkeypatch.setattr(JointRandAugment, "COLOUR", ())  # colours must stay readable for the check
    dataset = TokenLabelDataset(root / "train", labels, num_classes=10, img_size=128, grid=4, scale=(0.3, 1.0),
                                hflip=0.5, aa="rand-m9-mstd0.5-inc1")
    image0 = torch.zeros(3, 96, 96, dtype=torch.uint8)
    image0[0, :, :48] = 255
    image0[2, :, 48:] = 255
    label0 = dense_logits(read_label_map(label_path(labels, dataset.samples[0][0])), 10)
    random.seed(0)
    torch.manual_seed(0)
    checked = 0
    for _ in range(60):
        image, label = dataset.joint_transform(image0, label0)
        cells = image.float().unfold(1, 32, 32).unfold(2, 32, 32).mean((-1, -2))  # (3, 4, 4) mean colour per token
        for r in range(4):
            for c in range(4):
                red, blue = cells[0, r, c] / 255, cells[2, r, c] / 255
                if red > 0.9 and blue < 0.05:
                    assert label[:, r, c].argmax() == 0
                    checked += 1
                elif blue > 0.9 and red < 0.05:
                    assert label[:, r, c].argmax() == 1
                    checked += 1
    assert checked > 200  # most cells are pure; boundary cells are skipped


def test_generate_labels_and_train_with_them(tmp_path, capsys):
    root, _ = _two_colour_folder(tmp_path)
    out = tmp_path / "teacher_labels"
    assert main(["token-labels", "--teacher", "rmt_t", "--data", str(root / "train"), "--output", str(out),
                 "--img-size", "64", "--workers", "0", "--batch-size", "3"]) == 0
    assert "wrote 8 label maps (2x2, top-5 of 1000 classes)" in capsys.readouterr().out
    files = sorted(out.glob("*/*.pt"))
    assert len(files) == 8
    assert read_label_map(files[0]).shape == (2, 5, 2, 2)

    cfg = load_config(ClassificationConfig, "rmt_t", dict(
        data=str(root), token_label_data=str(out), img_size=64, batch_size=4, epochs=1, warmup_epochs=0, workers=0,
        mixup=0.0, cutmix=0.0, repeated_aug=False, model_ema=False, output=str(tmp_path / "run")))
    with pytest.raises(RMTError, match="indices out of range for 2 classes"):
        train(cfg)  # the teacher predicts 1000 classes, the folder has 2


def test_token_label_training_run(tmp_path):
    root, labels = _two_colour_folder(tmp_path)
    cfg = load_config(ClassificationConfig, "rmt_s_tl", dict(
        model="rmt_t", data=str(root), token_label_data=str(labels), img_size=64, batch_size=4, epochs=1,
        warmup_epochs=0, workers=0, reprob=0.25, output=str(tmp_path / "run")))
    result = train(cfg)
    state = read_run_checkpoint(result.output / "last.pth")
    assert state.meta["token_label"] and "aux_head.weight" in state.model
    assert result.final["train_loss"] > 0


def test_missing_label_files_are_reported(tmp_path):
    root, labels = _two_colour_folder(tmp_path, n=1)
    next(labels.glob("a/*.pt")).unlink()
    with pytest.raises(RMTError, match="no token label file"):
        TokenLabelDataset(root / "train", labels, num_classes=10, img_size=64, grid=2)


def test_token_label_loss_matches_definition():
    torch.manual_seed(0)
    b, k, g = 4, 6, 3
    logits, aux = torch.randn(b, k), torch.randn(b, g * g, k)
    dense = torch.randn(b, k, g, g) * 3
    box = (0, 0, 2, 3)  # 6 of 9 tokens mixed: lam = 1/3
    loss = TokenLabelLoss(dense_weight=0.5, cls_weight=1.0, smoothing=0.1)((logits, aux, box), dense)
    cls_t, tok_t = token_targets(dense, 0.1)
    cls_t = cls_t / 3 + cls_t.flip(0) * 2 / 3
    expected = -(cls_t * logits.log_softmax(-1)).sum(-1).mean() - 0.5 * (tok_t * aux.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(loss, expected)
    assert torch.allclose(tok_t.sum(-1), torch.ones(b, g * g))
