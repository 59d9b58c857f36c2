"""Tokenizer training losses: perceptual (VGG16 or a fallback), hinge GAN with a 3D
discriminator, and the adaptive GAN weight of the paper's eq. 6 (VQGAN).

Videos are (B, C, T, H, W) in [0, 1]. MSE is plain `F.mse_loss`; the LFQ terms come
from `quantize.LFQ`.

Perceptual loss. VGG16 features are used only from a local safetensors file the user
names (torchvision's `vgg16(...).features` key layout, with or without the `features.`
prefix; e.g. convert once with `safetensors.torch.save_file(vgg.state_dict(), F)` where
torchvision is available). Nothing is downloaded. Without a file, `perceptual_loss`
returns the fallback: L1 between spatial gradients at three scales plus (1 − SSIM) per
frame, which rewards sharp edges and local structure without any pretrained network.
Which one is in use is logged and exposed as `.name`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_tensors
from .metrics import ssim

log = logging.getLogger(__name__)


def _frames(video: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B·T, C, H, W)."""
    b, c, t, h, w = video.shape
    return video.transpose(1, 2).reshape(b * t, c, h, w)


# perceptual: VGG16


VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's indexing


class Vgg16Features(nn.Module):
    """VGG16 convolutional trunk with torchvision's module indices, frozen."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=False)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def load_file(self, path: str | Path) -> None:
        tensors = load_tensors(path)
        state = {(k if k.startswith("features.") else f"features.{k}"): v for k, v in tensors.items()}
        state = {k: v for k, v in state.items() if k.startswith("features.")}
        self.load_state_dict(state, strict=True)
        self.requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Images (N, C, H, W) in [0, 1] (grey is repeated to RGB) -> features at the taps."""
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        x = (x - self.mean) / self.std
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                taps.append(x)
            if i >= VGG16_TAPS[-1]:
                break
        return taps


class VggPerceptualLoss(nn.Module):
    """LPIPS-style distance without learned linear heads: channel-normalised feature MSE summed over taps."""

    name = "vgg16"

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        self.vgg = Vgg16Features()
        self.vgg.load_file(weights)
        self.vgg.eval()

    def train(self, mode: bool = True) -> "VggPerceptualLoss":
        super().train(mode)
        self.vgg.eval()  # frozen, always in eval
        return self

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        loss = recon.new_zeros(())
        for fr, ft in zip(self.vgg(_frames(recon)), self.vgg(_frames(target))):
            loss = loss + (F.normalize(fr, dim=1) - F.normalize(ft, dim=1)).pow(2).sum(1).mean()
        return loss


# perceptual: fallback


class GradientSsimLoss(nn.Module):
    """Fallback feature loss: multi-scale spatial-gradient L1 + (1 − SSIM), per frame."""

    name = "multiscale-gradient+ssim"

    def __init__(self, scales: int = 3) -> None:
        super().__init__()
        self.scales = scales

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        r, t = _frames(recon), _frames(target)
        loss = 1 - ssim(r, t)
        for scale in range(self.scales):
            if scale:
                r, t = F.avg_pool2d(r, 2), F.avg_pool2d(t, 2)
            loss = loss + (r.diff(dim=-1) - t.diff(dim=-1)).abs().mean() + (r.diff(dim=-2) - t.diff(dim=-2)).abs().mean()
        return loss


def perceptual_loss(vgg_weights: str | Path | None = None) -> nn.Module:
    """VGG16 perceptual loss from a local file if given, else the documented fallback; logs which."""
    if vgg_weights:
        module: nn.Module = VggPerceptualLoss(vgg_weights)
        log.info("perceptual loss: VGG16 features from %s", vgg_weights)
    else:
        module = GradientSsimLoss()
        log.info("perceptual loss: no VGG16 weights given, using the fallback (%s)", GradientSsimLoss.name)
    return module


# GAN


class Discriminator3d(nn.Module):
    """Small patch discriminator over space and time: (B, C, T, H, W) in [0, 1] -> logits per patch."""

    def __init__(self, channels: int = 1, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: tuple[int, int, int], norm: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv3d(cin, cout, 3, stride=stride, padding=1)]
            if norm:
                layers.append(nn.GroupNorm(8, cout))
            return layers + [nn.LeakyReLU(0.2)]

        self.net = nn.Sequential(
            *block(channels, width, (1, 2, 2), norm=False),
            *block(width, 2 * width, (2, 2, 2), norm=True),
            *block(2 * width, 4 * width, (1, 2, 2), norm=True),
            nn.Conv3d(4 * width, 1, 3, padding=1),
        )

    def forward(self, video: Tensor) -> Tensor:
        return self.net(video * 2 - 1)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    return -fake_logits.mean()


def adaptive_gan_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: list[Tensor], max_weight: float = 1e4) -> Tensor:
    """λ = ‖∇_W L_rec‖ / (‖∇_W L_GAN‖ + 1e-4) at the decoder's last layer W, clamped, no gradient."""
    rec_grads = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    gan_grads = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    rec_norm = torch.sqrt(sum(g.pow(2).sum() for g in rec_grads))
    gan_norm = torch.sqrt(sum(g.pow(2).sum() for g in gan_grads))
    return (rec_norm / (gan_norm + 1e-4)).clamp(0, max_weight).detach()
