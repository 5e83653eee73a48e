"""The dense CRF (deeplab.inference.crf): the permutohedral filter against an exact Gaussian, pydensecrf2, and a hand case."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from deeplab.inference.crf import CRFParams, PermutohedralLattice, dense_crf


def test_lattice_filter_is_a_gaussian_in_2d():
    # The permutohedral lattice approximates sum_j exp(-|f_i - f_j|^2 / 2) v_j up to one global scale; in 2-D the
    # approximation is tight. Compare with the exact O(N^2) sum on random points.
    torch.manual_seed(0)
    f = torch.rand(400, 2) * 6
    v = torch.rand(400, 1)
    out = PermutohedralLattice(f).filter(v)[:, 0].double()
    exact = (torch.exp(-torch.cdist(f.double(), f.double()) ** 2 / 2) @ v.double())[:, 0]
    scale = (out * exact).sum() / (exact * exact).sum()
    assert ((out - scale * exact).norm() / (scale * exact).norm()).item() < 0.05


def test_crf_removes_an_isolated_wrong_pixel():
    # A flat grey image; the network says class 0 everywhere (p = 0.8) except one pixel where it says class 1 (0.6).
    # With no colour edge to respect, both kernels pull that pixel to its neighbours' label.
    image = np.full((15, 15, 3), 128, np.uint8)
    probs = torch.zeros(2, 15, 15)
    probs[0], probs[1] = 0.8, 0.2
    probs[:, 7, 7] = torch.tensor([0.4, 0.6])
    out = dense_crf(image, probs)
    assert out.argmax(0).eq(0).all()
    assert torch.allclose(out.sum(0), torch.ones(15, 15), atol=1e-5)


def test_crf_keeps_a_label_edge_that_follows_a_colour_edge():
    # Left half black, right half white; the network is unsure (0.55) but right about which side is which. The
    # bilateral kernel sharpens each side's confidence and keeps the boundary on the colour edge.
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, 8:] = 255
    probs = torch.empty(2, 16, 16)
    probs[0, :, :8], probs[1, :, :8] = 0.55, 0.45
    probs[0, :, 8:], probs[1, :, 8:] = 0.45, 0.55
    out = dense_crf(image, probs)
    assert out[0, :, :8].min() > 0.55 and out[1, :, 8:].min() > 0.55


def test_crf_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(np.zeros((4, 4, 3), np.float32), torch.full((2, 4, 4), 0.5))
    with pytest.raises(ValueError, match="image's size"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), torch.full((2, 5, 4), 0.5))
    with pytest.raises(ValueError, match="backend"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), torch.full((2, 4, 4), 0.5), backend="opencv")


@pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None, reason="pydensecrf2 not installed (pip install 'deeplab[crf]')")
@pytest.mark.parametrize("params", [CRFParams(), CRFParams(iterations=5, bi_w=10, bi_xy_std=20, bi_rgb_std=13)])
def test_torch_crf_agrees_with_pydensecrf(params):
    # A structured image (two colour regions and noise) and random network probabilities, 3 classes.
    rng = np.random.default_rng(0)
    h, w = 60, 80
    image = np.zeros((h, w, 3), np.float64)
    image[:, 40:] = 200
    image[20:40, 10:30] = [30, 200, 60]
    image = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
    probs = torch.tensor(rng.normal(0, 1, (3, h, w)), dtype=torch.float32).softmax(0)
    ours = dense_crf(image, probs, params=params)
    theirs = dense_crf(image, probs, params=params, backend="pydensecrf")
    # Same algorithm, float32 vs float64 rounding: marginals within 1e-4, labels identical.
    assert (ours - theirs).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(0), theirs.argmax(0))
