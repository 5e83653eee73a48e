"""DeepLab v1/v2's fully connected CRF (Krähenbühl and Koltun, NIPS 2011) as post-processing, in pure torch.

Energy: unary -log P(label) from the network's softmax, plus two Potts pairwise terms over *all* pixel pairs:

- an appearance (bilateral) kernel  w1 * exp(-|p_i - p_j|^2 / 2 theta_a^2 - |I_i - I_j|^2 / 2 theta_b^2)
- a smoothness (Gaussian) kernel    w2 * exp(-|p_i - p_j|^2 / 2 theta_g^2)

minimised approximately by mean-field iterations, each a high-dimensional Gaussian filter of the current marginals.
The defaults are DeepLab v2's released ResNet-101 settings: 10 iterations, w1 = 4, theta_a = 67, theta_b = 3, w2 = 3,
theta_g = 1 (`CRFParams`).

The filter is the permutohedral lattice of Adams, Baek and Davis (Eurographics 2010) -- the same approximation
Krähenbühl's densecrf code (and so pydensecrf) uses: splat onto the lattice's simplex vertices with barycentric
weights, blur with [1/2, 1, 1/2] along each of the d+1 lattice directions, slice back. Each kernel is normalised
symmetrically (densecrf's NORMALIZE_SYMMETRIC: divide by sqrt of the filtered ones before and after), and the
mean-field update is densecrf's: Q <- softmax(-U + sum_m w_m * filter_m(Q)). The pure-torch version needs no
compiler and runs on any device; `backend="pydensecrf"` calls pydensecrf2 instead (``pip install 'deeplab[crf]'``).
tests/test_crf.py compares the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, kw_only=True)
class CRFParams:
    """Mean-field iterations and the two kernels' weights and standard deviations (pixels; colour in 0..255)."""

    iterations: int = 10
    bi_w: float = 4.0  # w1, appearance kernel weight
    bi_xy_std: float = 67.0  # theta_alpha
    bi_rgb_std: float = 3.0  # theta_beta
    pos_w: float = 3.0  # w2, smoothness kernel weight
    pos_xy_std: float = 1.0  # theta_gamma
    unary_clip: float = 1e-5  # probabilities are clipped here before -log (pydensecrf's unary_from_softmax)

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"CRF iterations must be >= 0, got {self.iterations}")
        for name in ("bi_xy_std", "bi_rgb_std", "pos_xy_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CRF {name} must be positive, got {getattr(self, name)}")


class PermutohedralLattice:
    """A Gaussian filter over points with (N, d) features (already divided by the standard deviations)."""

    def __init__(self, features: torch.Tensor) -> None:
        f = features.double()
        n, d = f.shape
        self.n, self.d = n, d
        dev = f.device
        # Elevate onto the hyperplane x_0 + ... + x_d = 0 (Adams et al. p.5), scaled so the blur is a unit Gaussian.
        inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
        scale = inv_std / torch.sqrt(torch.arange(1, d + 1, dtype=torch.float64, device=dev) * torch.arange(2, d + 2, dtype=torch.float64, device=dev))
        cf = f * scale  # (N, d)
        suffix = torch.zeros(n, d + 1, dtype=torch.float64, device=dev)
        suffix[:, :d] = cf.flip(1).cumsum(1).flip(1)  # suffix[:, j] = sum_{k >= j} cf[:, k]
        elevated = suffix.clone()
        j = torch.arange(1, d + 1, dtype=torch.float64, device=dev)
        elevated[:, 1:] = suffix[:, 1:] - j * cf
        # The nearest remainder-0 lattice point, and the simplex containing the point (ranks of the differences).
        rounded = torch.round(elevated / (d + 1))
        rem0 = rounded * (d + 1)
        total = rounded.sum(1, keepdim=True).long()
        diff = elevated - rem0
        # rank[i] = #{j > i: diff_j > diff_i} + #{j < i: diff_j >= diff_i}, as densecrf counts ties.
        gt = diff.unsqueeze(1) > diff.unsqueeze(2)  # [n, i, j]: diff_j > diff_i
        ge = diff.unsqueeze(1) >= diff.unsqueeze(2)
        upper = torch.ones(d + 1, d + 1, dtype=torch.bool, device=dev).triu(1)  # j > i
        rank = (gt & upper).sum(2) + (ge & upper.t()).sum(2)
        rank = rank + total
        low, high = rank < 0, rank > d
        rank = torch.where(low, rank + d + 1, torch.where(high, rank - d - 1, rank))
        rem0 = torch.where(low, rem0 + d + 1, torch.where(high, rem0 - d - 1, rem0))
        # Barycentric coordinates (p.10).
        v = (elevated - rem0) / (d + 1)
        bary = torch.zeros(n, d + 2, dtype=torch.float64, device=dev)
        bary.scatter_add_(1, d - rank, v)
        bary.scatter_add_(1, d - rank + 1, -v)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        self.weights = bary[:, : d + 1].float()  # (N, d+1)
        # The d+1 vertices: remainder r adds canonical[r, rank[i]] to rem0[i] (first d coordinates form the key).
        r = torch.arange(d + 1, device=dev).view(1, d + 1, 1)
        rk = rank[:, :d].unsqueeze(1)  # (N, 1, d)
        canonical = torch.where(rk <= d - r, r, r - (d + 1))  # (N, d+1, d)
        keys = rem0[:, :d].long().unsqueeze(1) + canonical  # (N, d+1, d)
        keys = keys.reshape(-1, d)
        self._lo = keys.min(0).values - (d + 1)  # room for the blur's neighbours
        span = keys.max(0).values + (d + 1) - self._lo + 1
        self._radix = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long, device=dev), span[:-1]]), 0)
        if float(span.double().log2().sum()) > 62:
            raise ValueError("CRF features span too large a lattice; lower the resolution or raise the std devs")
        codes = self._encode(keys)
        self.codes, inverse = torch.unique(codes, return_inverse=True)  # sorted
        self.offsets = inverse.view(n, d + 1)
        self.m = int(self.codes.numel())
        # Blur neighbours along each of the d+1 directions: key +- (1, ..., 1, -d at j, 1, ..., 1) (all +1 for j = d).
        lattice_keys = self._decode(self.codes)  # (M, d)
        self.neighbours = []
        for jdir in range(d + 1):
            step = torch.ones(d, dtype=torch.long, device=dev)
            if jdir < d:
                step[jdir] = -d
            self.neighbours.append((self._find(lattice_keys - step), self._find(lattice_keys + step)))

    def _encode(self, keys: torch.Tensor) -> torch.Tensor:
        return ((keys - self._lo) * self._radix).sum(-1)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = []
        rest = codes
        for k in range(self.d - 1, -1, -1):
            q = torch.div(rest, self._radix[k], rounding_mode="floor")
            out.append(q)
            rest = rest - q * self._radix[k]
        return torch.stack(out[::-1], dim=-1) + self._lo

    def _find(self, keys: torch.Tensor) -> torch.Tensor:
        """Index of each key among the lattice points, or M (a zero row) where there is none."""
        codes = self._encode(keys)
        pos = torch.searchsorted(self.codes, codes).clamp_max(self.m - 1)
        return torch.where(self.codes[pos] == codes, pos, torch.full_like(pos, self.m))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, C): splat, blur along every lattice direction, slice (densecrf's `compute`)."""
        c = values.shape[1]
        lattice = values.new_zeros(self.m + 1, c)  # row M stays zero: the missing neighbour
        lattice.index_add_(0, self.offsets.reshape(-1), (values.unsqueeze(1) * self.weights.unsqueeze(2)).reshape(-1, c))
        for before, after in self.neighbours:
            blurred = lattice[: self.m] + 0.5 * (lattice[before] + lattice[after])
            lattice = torch.cat([blurred, lattice.new_zeros(1, c)])
        alpha = 1.0 / (1.0 + 2.0 ** (-self.d))
        return (lattice[self.offsets] * self.weights.unsqueeze(2)).sum(1) * alpha


def _features(image: torch.Tensor, *, xy_std: float, rgb_std: float | None) -> torch.Tensor:
    h, w = image.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    feats = [xs.reshape(-1, 1) / xy_std, ys.reshape(-1, 1) / xy_std]  # densecrf orders (x, y)
    if rgb_std is not None:
        feats.append(image.reshape(-1, 3).float() / rgb_std)
    return torch.cat(feats, dim=1)


def _image_tensor(image) -> torch.Tensor:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"the CRF needs the RGB image as an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def dense_crf(image, probs: torch.Tensor, *, params: CRFParams = CRFParams(), backend: str = "torch") -> torch.Tensor:
    """Refine (K, H, W) class probabilities of the RGB uint8 `image` (H, W, 3); returns (K, H, W) marginals.

    `backend` "torch" (this module, no compiler needed) or "pydensecrf" (the optional pydensecrf2 package).
    """
    img = _image_tensor(image)
    if probs.dim() != 3 or tuple(probs.shape[1:]) != tuple(img.shape[:2]):
        raise ValueError(f"probs must be (K, H, W) at the image's size {tuple(img.shape[:2])}, got {tuple(probs.shape)}")
    if backend == "pydensecrf":
        return _dense_crf_pydensecrf(img.numpy(), probs, params)
    if backend != "torch":
        raise ValueError(f"unknown CRF backend {backend!r}; choose 'torch' or 'pydensecrf'")
    k, h, w = probs.shape
    unary = -probs.float().clamp_min(params.unary_clip).log().reshape(k, -1).t().cpu()  # (N, K)
    kernels = []
    for weight, xy, rgb in ((params.pos_w, params.pos_xy_std, None), (params.bi_w, params.bi_xy_std, params.bi_rgb_std)):
        if weight == 0:
            continue
        lattice = PermutohedralLattice(_features(img, xy_std=xy, rgb_std=rgb))
        norm = lattice.filter(torch.ones(h * w, 1)).add_(1e-20).rsqrt_()  # symmetric normalisation
        kernels.append((weight, lattice, norm))
    q = (-unary).softmax(dim=1)
    for _ in range(params.iterations):
        energy = -unary
        for weight, lattice, norm in kernels:
            energy = energy + weight * lattice.filter(q * norm) * norm
        q = energy.softmax(dim=1)
    return q.t().reshape(k, h, w).to(probs.device)


def _dense_crf_pydensecrf(image: np.ndarray, probs: torch.Tensor, params: CRFParams) -> torch.Tensor:
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise ImportError(
            "the pydensecrf CRF backend needs pydensecrf2: pip install 'deeplab[crf]' (or use backend='torch')"
        ) from e
    k, h, w = probs.shape
    p = probs.detach().float().cpu().numpy()
    unary = np.ascontiguousarray(-np.log(np.clip(p, params.unary_clip, None)).reshape(k, -1).astype(np.float32))
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(unary)
    if params.pos_w:
        crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    if params.bi_w:
        crf.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=np.ascontiguousarray(image),
                                 compat=params.bi_w)
    q = np.array(crf.inference(params.iterations), dtype=np.float32).reshape(k, h, w)
    return torch.from_numpy(q).to(probs.device)
