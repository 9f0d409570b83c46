"""Grad-CAM: the heat map's peak lands on the lesion, in the right orientation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from liverlesion import gradcam
from liverlesion.errors import UserError
from liverlesion.gradcam import compute_cam, gradcam_gallery, overlay_png

SIZE = 32
RADIUS = 5


class TinyNet(nn.Module):
    """Small CNN with global average pooling; exposes cam_target_layers() like the real model."""

    def __init__(self, in_chans: int = 3, n_classes: int = 2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # CAM at half resolution, upsampled by pytorch-grad-cam, as in real backbones
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))

    def cam_target_layers(self) -> list[nn.Module]:
        return [self.features[-1]]


class TinyLesionNet(TinyNet):
    """TinyNet pooling inside the lesion (``model.pool=lesion``): the mask is the input's last channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from liverlesion.model import lesion_pool

        return self.head(lesion_pool(self.features(x[:, :3]), x[:, 3:]))


def blob_patch(rng: np.random.Generator, cls: int, centre: tuple[int, int], shape=(SIZE, SIZE)):
    """Noisy grey patch with a bright (class 1) or dark (class 0) disc: (C, H, W) image and (H, W) mask."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= RADIUS**2
    img = 0.5 + 0.08 * rng.standard_normal((3, *shape))
    img[:, mask] = 0.95 if cls == 1 else 0.05
    return np.clip(img, 0, 1).astype(np.float32), mask


def random_batch(rng: np.random.Generator, n: int):
    xs, ys = [], []
    for _ in range(n):
        cls = int(rng.integers(0, 2))
        c = tuple(int(v) for v in rng.integers(RADIUS + 1, SIZE - RADIUS - 1, size=2))
        xs.append(blob_patch(rng, cls, c)[0])
        ys.append(cls)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


@pytest.fixture(scope="module")
def trained_net() -> TinyNet:
    """A network that can only solve the task by looking at the blob (placed at random positions)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(80):
        x, y = random_batch(rng, 32)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, y = random_batch(np.random.default_rng(1), 64)
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, (
        f"tiny net did not learn the blob task (accuracy {acc:.2f}); the CAM test would be meaningless"
    )
    return net


# Off-diagonal quadrants: a transposed map would land in the opposite quadrant, a flipped one
# in a neighbouring quadrant; the top-left/bottom-right diagonal could not reveal a transposition.
@pytest.mark.parametrize("centre", [(8, 23), (23, 8)], ids=["top-right", "bottom-left"])
def test_cam_peak_inside_lesion_and_orientation(trained_net: TinyNet, centre: tuple[int, int]):
    image, mask = blob_patch(np.random.default_rng(5), 1, centre)
    cam = compute_cam(trained_net, image, target_class=1)
    assert cam.shape == (SIZE, SIZE)
    assert cam.dtype == np.float32 and cam.min() >= 0.0 and cam.max() <= 1.0
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    assert mask[peak], f"CAM peak {peak} is outside the lesion centred at {centre}"
    quadrant = (peak[0] >= SIZE // 2, peak[1] >= SIZE // 2)
    assert quadrant == (centre[0] >= SIZE // 2, centre[1] >= SIZE // 2)
    # The heat map is concentrated on the lesion, not spread over the patch.
    assert cam[mask].mean() > 2 * cam[~mask].mean()


def test_cam_of_a_lesion_pooling_network_peaks_in_the_lesion():
    """model.pool=lesion: the mask channel goes in with the image; the map still points at the lesion."""
    from liverlesion.model_input import model_input

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = TinyLesionNet()
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)

    def batch(n):
        xs, ys = [], []
        for _ in range(n):
            cls = int(rng.integers(0, 2))
            c = tuple(int(v) for v in rng.integers(RADIUS + 1, SIZE - RADIUS - 1, size=2))
            img, mask = blob_patch(rng, cls, c)
            xs.append(model_input(img, mask, "lesion")[0])
            ys.append(cls)
        return torch.from_numpy(np.stack(xs)), torch.tensor(ys)

    for _ in range(60):
        x, y = batch(32)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    for centre in [(8, 23), (23, 8)]:
        image, mask = blob_patch(np.random.default_rng(5), 1, centre)
        cam = compute_cam(net, model_input(image, mask, "lesion")[0], target_class=1)
        assert cam.shape == (SIZE, SIZE) and cam.max() > cam.min()  # not a constant map
        peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
        assert mask[peak], f"CAM peak {peak} is outside the lesion centred at {centre}"


def test_cam_keeps_non_square_shape(trained_net: TinyNet):
    image, mask = blob_patch(np.random.default_rng(6), 1, (10, 36), shape=(SIZE, 48))
    cam = compute_cam(trained_net, image, target_class=1)
    assert cam.shape == (SIZE, 48)
    assert mask[np.unravel_index(int(np.argmax(cam)), cam.shape)]


def test_cam_restores_training_mode_and_leaves_no_hooks(trained_net: TinyNet):
    trained_net.train()
    compute_cam(trained_net, blob_patch(np.random.default_rng(7), 1, (16, 16))[0], 1)
    assert trained_net.training
    trained_net.eval()
    assert not trained_net.features[-1]._forward_hooks


def test_cam_rejects_wrong_shape(trained_net: TinyNet):
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        compute_cam(trained_net, np.zeros((1, 3, SIZE, SIZE), np.float32), 1)


def test_overlay_png_writes_png(tmp_path, trained_net: TinyNet):
    image, mask = blob_patch(np.random.default_rng(8), 1, (8, 8))
    cam = compute_cam(trained_net, image, 1)
    out = overlay_png(image[1], cam, tmp_path / "sub" / "overlay.png", mask_hw=mask, title="P1-L01 <test>")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def _patch_cache(tmp_path, rng, lesions):
    folder = tmp_path / "patches" / "abc123"
    folder.mkdir(parents=True)
    rows = []
    for lid, cls, centre in lesions:
        img, mask = blob_patch(rng, cls, centre)
        np.savez(
            folder / f"{lid}.npz",
            image=img[None],
            mask=mask[None].astype(np.uint8),
            hu=img[1][None] * 250 - 65,
        )
        rows.append({"lesion_id": lid, "file": f"{lid}.npz"})
    pd.DataFrame(rows).to_csv(folder / "index.csv", index=False)
    return folder


def test_gallery_draws_misclassified_first(tmp_path, monkeypatch, trained_net: TinyNet):
    rng = np.random.default_rng(9)
    lesions = [("P1-L01", 1, (8, 23)), ("P2-L01", 0, (20, 10)), ("P3-L01", 1, (16, 16))]
    patch_dir = _patch_cache(tmp_path, rng, lesions)
    run = tmp_path / "run"
    for k in (0, 1):
        (run / f"fold_{k}").mkdir(parents=True)
        (run / f"fold_{k}" / "model.pt").write_bytes(b"stub")
    loaded = []

    def fake_load(path):
        loaded.append(path)
        return trained_net, {"in_chans": 3, "class_names": ["cyst", "metastasis"]}

    monkeypatch.setattr(gradcam, "_load_model", fake_load)
    df = pd.DataFrame(
        {
            "patient_id": ["P1", "P2", "P3"],
            "lesion_id": [lid for lid, _, _ in lesions],
            "true_class": ["metastasis", "cyst", "metastasis"],
            "prob_cyst": [0.2, 0.3, 0.6],
            "prob_metastasis": [0.8, 0.7, 0.4],
            "pred_class": ["metastasis", "metastasis", "cyst"],
            "fold": ["0", "1", "1"],
        }
    )
    order = list(gradcam._order(df, ["cyst", "metastasis"])["lesion_id"])
    assert order == ["P2-L01", "P3-L01", "P1-L01"]  # wrong ones first, most confident mistake on top
    out = gradcam_gallery(run, df, patch_dir, max_items=2, out_png=run / "plots" / "gallery.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert len(loaded) == 1  # only fold 1's lesions fitted in max_items=2; each fold model loaded once


def test_gallery_without_models_is_a_user_error(tmp_path):
    patch_dir = _patch_cache(tmp_path, np.random.default_rng(10), [("P1-L01", 1, (8, 8))])
    df = pd.DataFrame(
        {
            "patient_id": ["P1"],
            "lesion_id": ["P1-L01"],
            "true_class": ["metastasis"],
            "prob_cyst": [0.2],
            "prob_metastasis": [0.8],
            "pred_class": ["metastasis"],
            "fold": ["0"],
        }
    )
    with pytest.raises(UserError, match="fold models"):
        gradcam_gallery(tmp_path / "run", df, patch_dir, 4, tmp_path / "g.png")
    with pytest.raises(UserError, match="patch cache not found"):
        gradcam_gallery(tmp_path / "run", df, tmp_path / "nowhere", 4, tmp_path / "g.png")
