"""Multi-scale averaging, flip un-flipping, sliding-window stitching and fixed-input-size resizing, checked with fake
"models" whose outputs are known functions of their input, against numbers worked out by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplab.inference.segment import (
    aligned_size,
    scaled_size,
    segment,
    segment_probs,
    segment_probs_batch,
    sliding_window_logits,
    window_starts,
)


class Identity(nn.Module):
    """Logits = the input's channels (K = 3); records the shape of every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return x.clone()


class CallNumber(nn.Module):
    """Logits = the number of the call (1, 2, ...) everywhere, one channel."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.full((x.shape[0], 1, *x.shape[-2:]), float(self.calls))


class ColumnRamp(nn.Module):
    """Two classes; logit 0 = 0.1 * column index, logit 1 = 0, whatever the image shows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ramp = 0.1 * torch.arange(w, dtype=torch.float32).expand(n, 1, h, w)
        return torch.cat([ramp, torch.zeros_like(ramp)], dim=1)


class HeightLogit(nn.Module):
    """Two classes; logit 0 = input height / 10 everywhere, logit 1 = 0 (so each scale gives a known logit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return torch.cat([torch.full((n, 1, h, w), h / 10.0), torch.zeros(n, 1, h, w)], dim=1)


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def integer_image(h: int, w: int, *, seed: int = 0) -> torch.Tensor:
    # Small integers: sums and divisions of them are exact in float32, so stitching can be compared with ==.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (1, 3, h, w), generator=g).float()


def test_window_starts_step_by_stride_and_end_at_the_border():
    assert window_starts(40, 16, 8) == [0, 8, 16, 24]
    assert window_starts(33, 16, 10) == [0, 10, 17]
    assert window_starts(16, 16, 8) == [0]
    assert window_starts(10, 16, 8) == [0]


def test_sliding_window_reassembles_the_input_exactly_through_an_identity_model():
    x = integer_image(37, 50)
    model = Identity()
    out = sliding_window_logits(model, x, window=16, overlap=0.5)
    assert torch.equal(out, x)
    # stride 8: rows start at 0, 8, 16, 21 and columns at 0, 8, 16, 24, 32, 34 -> 4 x 6 tiles, all 16 x 16
    assert len(model.seen) == 24
    assert {tuple(t.shape[-2:]) for t in model.seen} == {(16, 16)}


def test_sliding_window_divides_the_summed_logits_by_the_number_of_covering_tiles():
    # 16 x 40 image, 16 x 16 window, overlap 0.5: tiles 1..4 start at columns 0, 8, 16, 24.
    out = sliding_window_logits(CallNumber(), torch.zeros(1, 3, 16, 40), window=16, overlap=0.5)
    # Columns 0-7 see tile 1; 8-15 tiles 1+2; 16-23 tiles 2+3; 24-31 tiles 3+4; 32-39 tile 4.
    expected = [1.0] * 8 + [1.5] * 8 + [2.5] * 8 + [3.5] * 8 + [4.0] * 8
    assert out.shape == (1, 1, 16, 40)
    assert out[0, 0].tolist() == [expected] * 16


def test_sliding_window_pads_a_small_image_with_zeros_and_crops_the_result_back():
    x = integer_image(10, 13, seed=1)
    model = Identity()
    out = sliding_window_logits(model, x, window=16, overlap=0.33)
    assert torch.equal(out, x)
    (tile,) = model.seen
    assert tile.shape == (1, 3, 16, 16)
    assert torch.equal(tile[..., :10, :13], x)
    assert tile[..., 10:, :].abs().sum() == 0 and tile[..., :, 13:].abs().sum() == 0  # 0 = the mean pixel


def test_flip_runs_the_mirrored_image_and_mirrors_its_output_back():
    # The ramp model ignores the image, so the mirrored pass, mirrored back, is the reversed ramp:
    # p0(j) = (sigmoid(0.1 j) + sigmoid(0.1 (W - 1 - j))) / 2.
    w = 9
    probs = segment_probs(ColumnRamp(), torch.zeros(1, 3, 4, w), flip=True)
    expected = [(sigmoid(0.1 * j) + sigmoid(0.1 * (w - 1 - j))) / 2 for j in range(w)]
    assert probs[0, 0, 2].tolist() == pytest.approx(expected, abs=1e-6)
    # Without flip the ramp comes through as it is.
    single = segment_probs(ColumnRamp(), torch.zeros(1, 3, 4, w))
    assert single[0, 0, 2].tolist() == pytest.approx([sigmoid(0.1 * j) for j in range(w)], abs=1e-6)


def test_flip_of_a_mirror_equivariant_model_changes_nothing():
    # An identity model commutes with mirroring: un-flipping its output must give back the unflipped result
    # (a missing un-flip would average the image with its mirror, which differs: the image is not symmetric).
    x = integer_image(6, 11, seed=2)
    assert not torch.equal(x, x.flip(-1))
    flipped = segment_probs(Identity(), x, flip=True)
    assert torch.allclose(flipped, x.softmax(dim=1), atol=1e-6)


def test_multi_scale_averages_softmax_probabilities_over_scales():
    # A 20 x 20 image at scales 0.5, 1, 1.5 is 10, 20, 30 px high, so the model's logit 0 is 1, 2, 3 there:
    # TF DeepLab's rule gives p0 = mean(sigmoid(1), sigmoid(2), sigmoid(3)) = (0.73106 + 0.88080 + 0.95257) / 3
    # = 0.85481, not the softmax of the mean logit, sigmoid(2) = 0.88080.
    probs = segment_probs(HeightLogit(), torch.zeros(1, 3, 20, 20), scales=(0.5, 1.0, 1.5), align_corners=False)
    expected = (sigmoid(1.0) + sigmoid(2.0) + sigmoid(3.0)) / 3
    assert expected == pytest.approx(0.85481, abs=1e-5)
    assert probs.shape == (1, 2, 20, 20)
    assert torch.allclose(probs[:, 0], torch.full((1, 20, 20), expected), atol=1e-6)
    assert torch.allclose(probs.sum(dim=1), torch.ones(1, 20, 20), atol=1e-6)


def test_scaled_sizes_keep_the_16k_plus_1_form_with_align_corners():
    assert scaled_size((513, 513), 0.5, align_corners=True) == (257, 257)
    assert scaled_size((513, 385), 0.75, align_corners=True) == (385, 289)
    assert scaled_size((513, 513), 1.25, align_corners=True) == (641, 641)
    assert scaled_size((512, 100), 0.75, align_corners=False) == (384, 75)


def linear_ramp(h: int, w: int) -> torch.Tensor:
    # Bilinear resizing with align_corners=True reproduces a linear function exactly (up to rounding).
    ys = torch.linspace(-1.0, 1.0, h).view(h, 1)
    xs = torch.linspace(-2.0, 2.0, w).view(1, w)
    return torch.stack([ys + 0 * xs, xs + 0 * ys, 0.5 * ys - 0.25 * xs])[None]


def test_fixed_input_size_runs_the_model_at_that_size_and_resizes_back():
    x = linear_ramp(21, 31)
    model = Identity()
    probs = segment_probs(model, x, input_size=(9, 13), align_corners=True)
    assert [tuple(t.shape[-2:]) for t in model.seen] == [(9, 13)]
    assert probs.shape == (1, 3, 21, 31)
    assert torch.allclose(probs, x.softmax(dim=1), atol=1e-5)


def test_window_scales_and_flip_combine_on_a_linear_image():
    # Identity model + linear image + align_corners: every (scale, flip, tile) pass returns the image itself.
    x = linear_ramp(41, 57)
    model = Identity()
    probs = segment_probs(model, x, scales=(0.75, 1.0, 1.25), flip=True, window=24, overlap=0.33, align_corners=True)
    assert torch.allclose(probs, x.softmax(dim=1), atol=1e-5)
    assert {tuple(t.shape[-2:]) for t in model.seen} == {(24, 24)}
    labels = segment(model, x, scales=(0.75, 1.0), window=24, align_corners=True)
    top2 = x.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3  # the ramp's channels tie along lines; rounding may pick either there
    assert clear.float().mean() > 0.95
    assert torch.equal(labels[clear], x.argmax(dim=1)[clear])


class StridedRamp(nn.Module):
    """A DeepLab in miniature, output stride 16, align_corners=True: its features are the input's first channel at
    pixels 0, 16, 32, ... (where a stack of stride-2 layers samples a 16k+1 input), its logits (feature, THRESHOLD)
    upsampled to the input's size with align_corners=True. Records the sizes it sees."""

    THRESHOLD = 200.5

    def __init__(self, *, static_input: bool = False) -> None:
        super().__init__()
        self.config = SimpleNamespace(output_stride=16, align_corners=True)
        self.static_input = static_input
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        features = x[:, :1, ::16, ::16]
        up = F.interpolate(features, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([up, torch.full_like(up, self.THRESHOLD)], dim=1)


def column_ramp(h: int, w: int) -> torch.Tensor:
    """Channel 0 = the column index: a pixel's class under StridedRamp is 0 exactly from column 201 on."""
    return torch.cat([torch.arange(w, dtype=torch.float32).expand(1, 1, h, w), torch.zeros(1, 2, h, w)], dim=1)


@pytest.mark.parametrize("width", [300, 321, 410, 257])
def test_align_corners_models_run_at_16k_plus_1_so_the_class_boundary_stays_where_the_image_puts_it(width):
    # Hand-worked: at 16k+1 columns the samples fall on 0, 16, ..., so the upsampled ramp is the ramp and the class
    # changes between columns 200 and 201. Unpadded, 300 columns give 19 samples stretched over 0..299: the ramp
    # reads 0.963 x column and the boundary moves to column 208 (TF DeepLab pads to 16k+1 for this reason).
    x = column_ramp(33, width)
    model = StridedRamp()
    labels = segment(model, x)[0]
    assert model.sizes == [(33, aligned_size(width, 16))] and all((s - 1) % 16 == 0 for s in model.sizes[0])
    assert (labels[:, :201] == 1).all() and (labels[:, 201 : width - 16] == 0).all()
    batched = next(segment_probs_batch(model, [x]))
    assert torch.equal(batched.argmax(1)[0], labels)
    assert aligned_size(300, 16) == 305 and aligned_size(321, 16) == 321 and aligned_size(300, None) == 300


def test_a_static_graph_is_fed_its_own_size_unpadded():
    model = StridedRamp(static_input=True)
    segment(model, column_ramp(33, 300))
    assert model.sizes == [(33, 300)]


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"overlap": 1.0, "window": 8}, "overlap"), ({"scales": ()}, "scales"), ({"scales": (1.0, -0.5)}, "scales")],
)
def test_bad_inference_options_are_rejected_by_name(kwargs, word):
    with pytest.raises(ValueError, match=word):
        segment_probs(Identity(), torch.zeros(1, 3, 8, 8), **kwargs)
