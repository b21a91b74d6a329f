"""RMT as a segmentation-models-pytorch encoder, through timm's universal encoder (`tu-rmt_*`):
building, loading official and our weights into the encoder, and the few-step training example of
docs/smp.md on the bundled shapes data."""
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F

from golden import load_golden, official_state_dict, save_official_checkpoint
from rmt.data.ade20k import IGNORE_INDEX, ADE20KDataset
from rmt.data.shapes import SHAPE_CLASSES, generate_shapes
from rmt.models import create_model
from rmt.models.hub import save_hub_folder


def _encoder_state(unet) -> dict:
    """The encoder's RMT weights under the RMT's own key names (timm's feature wrapper adds `model.`)."""
    return {k.removeprefix("model."): v for k, v in unet.encoder.model.state_dict().items()}


def test_unet_with_an_rmt_encoder():
    unet = smp.Unet("tu-rmt_t", encoder_weights=None, classes=4).eval()
    assert unet.encoder.out_channels == [3, 0, 64, 128, 256, 512]  # strides 4..32, no stride-2 stage
    with torch.no_grad():
        assert unet(torch.randn(2, 3, 64, 96)).shape == (2, 4, 64, 96)


def test_official_and_our_weights_in_the_encoder(tmp_path):
    weights = official_state_dict(load_golden("official_keys_rmt_t")["keys"])
    path = save_official_checkpoint(tmp_path / "RMT-T.pth", weights)
    expected = create_model("rmt_t", checkpoint=path).state_dict()
    official = smp.Unet("tu-rmt_t", encoder_weights=True, classes=4, pretrained_cfg_overlay=dict(file=str(path)))
    folder = save_hub_folder(create_model("rmt_t", checkpoint=path), tmp_path / "rmt_t", model_name="rmt_t")
    ours = smp.Unet(f"tu-local-dir:{folder}", encoder_weights=True, classes=4)
    for unet in (official, ours):
        state = _encoder_state(unet)
        assert len(state) > 100
        for key, value in state.items():
            assert torch.equal(value, expected[key]), key


@pytest.mark.e2e
def test_training_on_shapes_few_steps(tmp_path):
    """The docs/smp.md example: a U-Net with an RMT-T encoder learns the shapes masks (loss goes down)."""
    root = generate_shapes(tmp_path / "shapes", num_train=8, num_val=2, image_size=64)
    dataset = ADE20KDataset(root, "training")  # labels 0 background, 1..3 the shapes, 255 ignored
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    unet = smp.Unet("tu-rmt_t", encoder_weights=None, classes=1 + len(SHAPE_CLASSES),
                    decoder_channels=(64, 32, 16, 8, 8))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        for images, labels in loader:
            loss = F.cross_entropy(unet(images), labels, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses
    unet.eval()
    with torch.no_grad():
        prediction = unet(dataset[0][0][None]).argmax(1)[0]
    assert prediction.shape == dataset[0][1].shape
    assert timm.is_model("rmt_t")
