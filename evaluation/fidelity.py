"""Fidelity of a cached image to the uncached image with the same seed.

Images are float arrays in [0, 1] of shape (N, C, H, W) (or uint8 (N, H, W, C), converted on entry).
PSNR follows the InvarDiff evaluation protocol (100 dB when the images are identical); SSIM is the standard
Gaussian-window SSIM (window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1), averaged over the interior where
the window fits, as scikit-image does.

Hand-written, not torchmetrics, because MS-SSIM must work on 16 px digits (torchmetrics refuses images under
161 px); tests/test_fidelity.py checks all three against torchmetrics where it applies.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def as_unit_float(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images))
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 255.0 if x.ndim == 4 else x.float() / 255.0
    return x.float()


def psnr(a, b) -> np.ndarray:
    """Per-image PSNR in dB, capped at 100 dB for identical images."""
    x, y = as_unit_float(a), as_unit_float(b)
    mse = (x - y).pow(2).flatten(1).mean(1)
    value = 20 * torch.log10(1.0 / mse.clamp_min(1e-20).sqrt())
    return torch.where(mse < 1e-10, torch.full_like(value, 100.0), value).numpy()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_maps(x: torch.Tensor, y: torch.Tensor, win: int, sigma: float = 1.5):
    c = x.shape[1]
    g = _gaussian_window(win, sigma)
    kernel_h = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    kernel_v = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, kernel_h, groups=c), kernel_v, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    contrast_structure = (2 * sxy + c2) / (sxx + syy + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return luminance * contrast_structure, contrast_structure


def _window_for(size: int, win: int) -> int:
    # Small images (16 px digits) cannot hold an 11-px window at every scale; shrink it, keeping it odd.
    w = min(win, size)
    return w if w % 2 == 1 else w - 1


def ssim(a, b, win: int = 11) -> np.ndarray:
    """Per-image mean SSIM."""
    x, y = as_unit_float(a), as_unit_float(b)
    w = _window_for(min(x.shape[-2:]), win)
    s, _ = _ssim_maps(x, y, w)
    return s.flatten(1).mean(1).numpy()


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim(a, b, win: int = 11) -> np.ndarray:
    """Per-image multi-scale SSIM (Wang et al. 2003) over as many of the 5 scales as the image size allows."""
    x, y = as_unit_float(a), as_unit_float(b)
    levels = 1
    while levels < len(MS_SSIM_WEIGHTS) and min(x.shape[-2:]) // (2**levels) >= 3:
        levels += 1
    weights = torch.tensor(MS_SSIM_WEIGHTS[:levels])
    weights = weights / weights.sum()
    factors = []
    for level in range(levels):
        w = _window_for(min(x.shape[-2:]), win)
        s, cs = _ssim_maps(x, y, w)
        if level == levels - 1:
            factors.append(s.flatten(1).mean(1).clamp_min(0))
        else:
            factors.append(cs.flatten(1).mean(1).clamp_min(0))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(factors, dim=1)
    return torch.prod(stacked ** weights[None], dim=1).numpy()


def relative_error(final, reference) -> float:
    """||x - x_ref|| / ||x_ref|| over the whole batch of final sampler outputs."""
    x = torch.as_tensor(final).double()
    r = torch.as_tensor(reference).double()
    return float((x - r).norm() / r.norm())
