"""evaluation/fidelity.py agrees with torchmetrics, the reference implementation of PSNR, SSIM and MS-SSIM.

One convention differs and is accounted for: SSIM here is the mean over the interior where the 11 px window
fits (scikit-image's and Wang et al.'s convention); torchmetrics averages its map over the whole image, with
reflected borders. The tests compare torchmetrics' own SSIM map on that interior.

fidelity.py stays hand-written for one reason: MS-SSIM on the 16 px digits. torchmetrics needs images larger
than (kernel - 1) x 2^4 = 160 px for its five scales and refuses smaller ones; ours uses as many scales as the
image allows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure as tm_ms_ssim,
)
from torchmetrics.functional.image import peak_signal_noise_ratio as tm_psnr
from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

from evaluation import fidelity


def image_pairs(size: int, count: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random images and a perturbed copy (float (N, 3, H, W) in [0, 1]): structure for SSIM to see."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, size // 8, size // 8, generator=generator)
    reference = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noise = 0.05 * torch.randn(reference.shape, generator=generator)
    return reference, (reference + noise).clamp(0, 1)


def test_psnr_agrees_with_torchmetrics():
    reference, test = image_pairs(32)
    ours = fidelity.psnr(test, reference)
    theirs = tm_psnr(test, reference, data_range=1.0, reduction="none", dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert fidelity.psnr(reference, reference).tolist() == [100.0] * 4  # the paper's cap for identical images


HALF_WINDOW = 5  # of the 11 px window


def interior_ssim(test: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """torchmetrics' SSIM map, averaged where the window fits."""
    _, full = tm_ssim(test, reference, kernel_size=11, sigma=1.5, data_range=1.0, reduction="none",
                      return_full_image=True)  # fmt: skip
    return full[..., HALF_WINDOW:-HALF_WINDOW, HALF_WINDOW:-HALF_WINDOW].flatten(1).mean(1)


@pytest.mark.parametrize("size", [16, 64])
def test_ssim_agrees_with_torchmetrics(size):
    reference, test = image_pairs(size)
    ours = fidelity.ssim(test, reference)
    np.testing.assert_allclose(ours, interior_ssim(test, reference).numpy(), atol=1e-5)
    assert ours.max() < 0.99  # the pairs differ: agreement is not both saying 1.0


def test_ms_ssim_agrees_with_torchmetrics_where_torchmetrics_applies():
    """Wang et al.'s product, each factor computed by torchmetrics: the contrast-structure term at the four
    finer scales (torchmetrics already averages it over the interior) and SSIM at the coarsest."""
    reference, test = image_pairs(192, count=2)
    weights = torch.tensor(fidelity.MS_SSIM_WEIGHTS, dtype=torch.float64)
    weights = weights / weights.sum()
    x, y, factors = test, reference, []
    for _ in range(len(weights) - 1):
        _, contrast_structure = tm_ssim(x, y, kernel_size=11, sigma=1.5, data_range=1.0, reduction="none",
                                        return_contrast_sensitivity=True)  # fmt: skip
        factors.append(contrast_structure.clamp_min(0))
        x, y = torch.nn.functional.avg_pool2d(x, 2), torch.nn.functional.avg_pool2d(y, 2)
    factors.append(interior_ssim(x, y).clamp_min(0))
    expected = torch.prod(torch.stack(factors, 1).double() ** weights, dim=1).numpy()
    np.testing.assert_allclose(fidelity.ms_ssim(test, reference), expected, atol=1e-5)
    # torchmetrics' own MS-SSIM differs only by its whole-image mean at the coarsest (12 px) scale.
    whole = tm_ms_ssim(test, reference, kernel_size=11, sigma=1.5, data_range=1.0, reduction="none").numpy()
    np.testing.assert_allclose(fidelity.ms_ssim(test, reference), whole, atol=0.05)


def test_ms_ssim_of_digits_sized_images_is_why_ours_is_kept():
    reference, test = image_pairs(16)
    with pytest.raises(ValueError):
        tm_ms_ssim(test, reference, kernel_size=11, data_range=1.0)
    values = fidelity.ms_ssim(test, reference)
    assert np.all((values > 0) & (values < 1))
