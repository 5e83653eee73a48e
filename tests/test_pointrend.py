"""PointRend (deeplab.models.pointrend): point sampling, point selection, adaptive subdivision, the model and its export."""

from __future__ import annotations

import pytest
import torch

from deeplab import ModelConfig, build_model
from deeplab.deploy.fast import optimize_for_inference
from deeplab.models.pointrend import (
    PointHead,
    point_labels,
    point_sample,
    subdivide,
    subdivision_steps,
    training_points,
    uncertainty,
)


def test_point_sample_reads_pixel_centres_and_interpolates_between_them():
    f = torch.arange(12.0).view(1, 1, 3, 4)  # value = 4 * row + col
    # Pixel centre of (row 1, col 2) is ((2 + 0.5) / 4, (1 + 0.5) / 3); halfway between cols 0 and 1 of row 0.
    coords = torch.tensor([[[2.5 / 4, 1.5 / 3], [1.0 / 4, 0.5 / 3]]])
    assert point_sample(f, coords).flatten().tolist() == pytest.approx([6.0, 0.5])


def test_point_labels_are_nearest_and_keep_the_ignore_label():
    target = torch.tensor([[[0, 1], [255, 3]]])
    coords = torch.tensor([[[0.3, 0.2], [0.7, 0.2], [0.2, 0.9], [0.9, 0.9]]])
    assert point_labels(target, coords).tolist() == [[0, 1, 255, 3]]


def test_uncertainty_is_minus_the_top_two_gap():
    logits = torch.tensor([[[[3.0]], [[1.0]], [[2.5]]]])  # (1, 3, 1, 1): top two 3.0 and 2.5
    assert uncertainty(logits).item() == pytest.approx(-0.5)


def test_training_points_favour_the_uncertain_band():
    # Coarse logits certain everywhere except a vertical band x in [0.4, 0.6), where the two classes tie.
    coarse = torch.zeros(1, 2, 32, 32)
    coarse[:, 0] = 5.0
    coarse[:, :, :, 13:19] = 0.0  # columns 13..18 of 32: x in [0.406, 0.594]
    torch.manual_seed(0)
    pts = training_points(coarse, 1000, oversample=3.0, importance=0.75)
    assert pts.shape == (1, 1000, 2) and pts.min() >= 0 and pts.max() <= 1
    in_band = ((pts[0, :, 0] > 0.39) & (pts[0, :, 0] < 0.61)).float()
    # The first 750 are the most uncertain of 3000 uniform draws: about 0.19 * 3000 = 560 lie in the band, all of
    # which rank first; the last 250 are uniform (about 19% in the band).
    assert in_band[:500].mean() == 1.0
    assert 0.08 < in_band[750:].mean() < 0.32


class _ConstantHead(PointHead):
    """A point head that answers logit 100 for class 1 at every point it is asked about."""

    def forward(self, fine, coarse):
        out = torch.zeros_like(coarse)
        out[:, 1] = 100.0
        return out


def test_subdivision_refines_exactly_the_most_uncertain_points_per_step():
    # Coarse 4x4 -> output 16x16: two 2x steps. Class 0 leads everywhere, by less in the left column.
    coarse = torch.zeros(1, 2, 4, 4)
    coarse[:, 0] = 4.0
    coarse[:, 0, :, 0] = 1.0
    head = _ConstantHead(fine_channels=3, num_classes=2)
    fine = torch.randn(1, 3, 16, 16)
    assert subdivision_steps((4, 4), (16, 16)) == 2
    out = subdivide(head, coarse, fine, (16, 16), num_points=5)
    # Each step rewrites 5 points with class 1 (logit 100); step 2's bilinear upsampling spreads step 1's 5 points
    # over a neighbourhood before 5 more are rewritten, so some but not all pixels end as class 1.
    labels = out.argmax(1)
    assert 5 <= int(labels.sum()) < 16 * 16 // 4
    # With zero steps the output is the plain bilinear upsampling of the coarse logits.
    plain = subdivide(head, coarse, fine, (16, 16), num_points=5, steps=0)
    assert torch.allclose(plain, torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear"))
    assert int(plain.argmax(1).sum()) == 0


@pytest.mark.parametrize("decoder", [False, True])
def test_pointrend_model_trains_and_infers(decoder):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilenet_v2", num_classes=3, decoder=decoder, pointrend=True,
                      pointrend_train_points=64, pointrend_points=100, aspp_channels=32, decoder_channels=32)
    model = build_model(cfg)
    out = model(torch.randn(2, 3, 65, 65))
    assert out["logits"].shape == (2, 3, 65, 65)
    assert out["point_logits"].shape == (2, 3, 64) and out["point_coords"].shape == (2, 64, 2)
    loss = out["logits"].mean() + out["point_logits"].mean()
    loss.backward()
    assert model.point_head.predictor.weight.grad is not None
    model.eval()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (1, 3, 70, 90)
        fast = optimize_for_inference(model)
        assert (fast(x) - y).abs().max() <= 1e-4 * y.abs().max()


def test_pointrend_export_needs_one_fixed_size(tmp_path):
    pytest.importorskip("onnxruntime")
    from deeplab.deploy.export import export_model

    model = build_model(ModelConfig(backbone="mobilenet_v2", num_classes=3, decoder=False, pointrend=True,
                                    aspp_channels=32, pointrend_points=50))
    with pytest.raises(ValueError, match="one fixed input size"):
        export_model(model, tmp_path / "m.onnx", format="onnx", sizes=[(65, 65), (49, 81)])
    res = export_model(model, tmp_path / "m.onnx", format="onnx", sizes=[(65, 81), (65, 81)])
    assert max(res["max_rel_diff"].values()) < 1e-4
