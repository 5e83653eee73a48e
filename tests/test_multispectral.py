"""Models of N input bands: every backbone's stem, the first convolution adapted from RGB weights, per-band
normalisation measured from the data, 4-band training from RGB weights end to end, and exports that keep N bands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deeplab
from deeplab import ModelConfig, build_model, save_checkpoint
from deeplab.cli import main
from deeplab.models.backbones import BACKBONES
from deeplab.models.config import Preprocessing
from deeplab.models.input_conv import adapt_input_conv, input_conv_name

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = dict(depth_multiplier=0.5, separable=True, aspp_channels=16, decoder_channels=16, low_level_channels=8)
SMALL_RUN = ["--crop-size", "33", "--min-scale", "1", "--max-scale", "1", "--batch-size", "4", "--steps", "2",
             "--val-every", "0", "--precise-bn-images", "4", "--val-images", "1", "--quiet", "--separable",
             "--aspp-channels", "16", "--decoder-channels", "16", "--low-level-channels", "8"]


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_reads_the_bands_its_config_asks_for(backbone):
    with torch.device("meta"):  # shapes only: no weights, no memory
        model = build_model(ModelConfig(backbone=backbone, num_classes=3, in_channels=5)).eval()
        with torch.no_grad():
            out = model(torch.empty(2, 5, 65, 65))
    stem = dict(model.backbone.named_parameters())[input_conv_name(model.backbone)]
    assert stem.shape[1] == 5 and tuple(out.shape) == (2, 3, 65, 65)
    assert model.preprocessing == Preprocessing(mean=(0.0,) * 5, std=(1.0,) * 5)  # one value per band


def test_an_rgb_kernel_becomes_n_bands_by_colour_mean_and_3_over_n():
    torch.manual_seed(0)
    rgb = torch.randn(8, 3, 3, 3)
    out = adapt_input_conv(rgb, bands=5, rgb=(2, 1, 0))  # blue, green, red first; then two other bands
    np.testing.assert_allclose(out[:, 2], rgb[:, 0] * 3 / 5, rtol=1e-6)  # band 2 is red
    np.testing.assert_allclose(out[:, 1], rgb[:, 1] * 3 / 5, rtol=1e-6)
    np.testing.assert_allclose(out[:, 0], rgb[:, 2] * 3 / 5, rtol=1e-6)
    mean = (rgb[:, 0] + rgb[:, 1] + rgb[:, 2]) / 3
    np.testing.assert_allclose(out[:, 3], mean * 3 / 5, rtol=1e-6)
    np.testing.assert_allclose(out[:, 4], mean * 3 / 5, rtol=1e-6)
    # A grey input (every band the same) gives what the RGB kernel gives for a grey image, at any band count.
    grey = torch.randn(1, 1, 9, 9)
    for bands, colours in ((5, (2, 1, 0)), (4, (0, 1, 2)), (1, None), (7, None)):
        adapted = adapt_input_conv(rgb, bands=bands, rgb=colours)
        np.testing.assert_allclose(F.conv2d(grey.expand(1, bands, 9, 9), adapted),
                                   F.conv2d(grey.expand(1, 3, 9, 9), rgb), rtol=1e-4, atol=1e-5)
    assert adapt_input_conv(rgb, bands=3) is rgb
    with pytest.raises(ValueError, match="--rgb-bands 0,1,4: .* below --bands 4"):
        adapt_input_conv(rgb, bands=4, rgb=(0, 1, 4))


def test_a_4_band_run_starts_from_rgb_weights_with_the_first_conv_adapted(tmp_path, classified_tiles, capsys):
    root = classified_tiles(tmp_path / "export")  # bands named Red, Green, Blue, NearInfrared
    rgb = build_model(ModelConfig(backbone="mobilenet_v2", num_classes=21, **TINY))
    rgb_path = save_checkpoint(rgb, tmp_path / "rgb.pt")
    out = tmp_path / "run"
    code = main(["train", "--dataset", "classified-tiles", "--data-root", str(root), "--out", str(out),
                 "--init-checkpoint", str(rgb_path), "--backbone", "mobilenet_v2", "--depth-multiplier", "0.5",
                 "--lr", "0", *SMALL_RUN])  # no learning: the weights stay as they started
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "adapted to 4 bands" in printed.out
    trained = deeplab.load(out / "last.pt")
    key = "backbone." + input_conv_name(trained.backbone)
    expected = adapt_input_conv(rgb.state_dict()[key], bands=4, rgb=(0, 1, 2))
    torch.testing.assert_close(trained.state_dict()[key], expected)
    assert trained.config.in_channels == 4 and len(trained.preprocessing.mean) == 4


def test_backbone_weights_of_rgb_are_adapted_too(tmp_path, classified_tiles, capsys):
    root = classified_tiles(tmp_path / "export")
    imagenet = build_model(ModelConfig(backbone="mobilenet_v3_small", num_classes=21)).backbone
    torch.save(imagenet.state_dict(), tmp_path / "mobilenet_v3_small.pth")  # torchvision's names (features.*)
    out = tmp_path / "run"
    code = main(["train", "--dataset", "classified-tiles", "--data-root", str(root), "--out", str(out),
                 "--backbone", "mobilenet_v3_small", "--backbone-weights", str(tmp_path / "mobilenet_v3_small.pth"),
                 "--rgb-bands", "2,1,0", "--lr", "0", *SMALL_RUN])
    assert code == 0, capsys.readouterr().err
    trained = deeplab.load(out / "last.pt")
    expected = adapt_input_conv(imagenet.state_dict()["features.0.0.weight"], bands=4, rgb=(2, 1, 0))
    torch.testing.assert_close(trained.state_dict()["backbone.features.0.0.weight"], expected)


def test_float_reflectance_chips_are_normalised_by_their_own_band_statistics(tmp_path, classified_tiles, capsys):
    root = classified_tiles(tmp_path / "export", bands=5, dtype="float32")  # reflectance 0.2, 0.4, 0.6 + noise
    code = main(["data", "--dataset", "classified-tiles", "--data-root", str(root), "--splits", "train", "--json",
                 "--quiet"])
    stats = json.loads(capsys.readouterr().out)["band_stats"]
    assert code == 0 and stats["bands"] == 5 and stats["dtype"] == "float32"
    assert all(0.2 < m < 0.6 for m in stats["mean"]) and all(0.05 < s < 0.3 for s in stats["std"])
    out = tmp_path / "run"
    assert main(["train", "--dataset", "classified-tiles", "--data-root", str(root), "--out", str(out),
                 "--backbone", "mobilenet_v2", "--depth-multiplier", "0.5", *SMALL_RUN]) == 0
    model = deeplab.load(out / "last.pt")
    np.testing.assert_allclose(model.preprocessing.mean, stats["mean"])
    np.testing.assert_allclose(model.preprocessing.std, stats["std"])


def test_bands_that_disagree_with_the_data_are_named(tmp_path, classified_tiles, capsys):
    root = classified_tiles(tmp_path / "export")
    code = main(["train", "--dataset", "classified-tiles", "--data-root", str(root), "--out", str(tmp_path / "run"),
                 "--bands", "3", "--backbone", "mobilenet_v2", *SMALL_RUN])
    err = capsys.readouterr().err
    assert code == 2 and "--bands 3:" in err and "4-band images" in err
    code = main(["train", "--bands", "0"])
    assert code == 2 and "--bands 0: must be a positive number of bands" in capsys.readouterr().err


def test_a_checkpoint_from_before_bands_loads_as_rgb():
    cfg = ModelConfig(backbone="mobilenet_v2", num_classes=2, **TINY).to_dict()
    del cfg["in_channels"]
    assert ModelConfig.from_dict(cfg).in_channels == 3
    assert Preprocessing.from_dict({"mean": [1, 2, 3], "std": [4, 5, 6]}).bands == 3


@pytest.mark.parametrize("fmt, suffix, runtime", [("onnx", ".onnx", "onnxruntime"), ("openvino", ".xml", "openvino")])
def test_exports_keep_the_bands_and_the_export_colours(tmp_path, fmt, suffix, runtime):
    pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install 'deeplab[onnx]'")
    if fmt == "openvino":
        pytest.importorskip("openvino", reason="pip install 'deeplab[openvino]'")
    from deeplab.deploy.export import export_model
    from deeplab.deploy.runners import load_exported, read_metadata

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mobilenet_v2", num_classes=3, in_channels=4, **TINY),
                        class_names=["water", "field", "forest"], class_colors=[(0, 0, 255), (9, 9, 9), (0, 128, 0)],
                        class_values=[1, 3, 7], preprocessing=Preprocessing(mean=(1.0, 2.0, 3.0, 4.0),
                                                                            std=(5.0, 6.0, 7.0, 8.0))).eval()
    path = tmp_path / f"model{suffix}"
    export_model(model, path, format=fmt, sizes=((65, 65), (49, 81)))
    meta = read_metadata(path)
    assert meta["mean"] == [1.0, 2.0, 3.0, 4.0] and meta["model_config"]["in_channels"] == 4
    assert meta["class_colors"][0] == [0, 0, 255] and meta["palette"][2] == [0, 128, 0]
    assert meta["input"].startswith("image: float32 (N, 4, H, W)")
    loaded = load_exported(path, runtime=runtime)
    x = torch.randn(1, 4, 65, 65)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-3, atol=1e-3)
    assert loaded.class_values == (1, 3, 7)
    if fmt == "onnx":
        import onnx

        dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
        assert dims[1].dim_value == 4


def test_predict_reads_an_n_band_array_or_file_in_its_own_units(tmp_path, classified_tiles):
    root = classified_tiles(tmp_path / "export", n=2)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mobilenet_v2", num_classes=3, in_channels=4, **TINY),
                        preprocessing=Preprocessing(mean=(2000.0,) * 4, std=(800.0,) * 4)).eval()
    torch.nn.init.normal_(model.classifier.weight)  # logits far apart: TF's 0.01 init leaves them within rounding
    chip = root / "images" / "000000000.tif"
    from deeplab.data.bands import read_bands

    image = read_bands(chip)
    assert image.shape == (32, 32, 4) and image.dtype == np.uint16
    x = (torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1) - 2000.0) / 800.0
    with torch.no_grad():
        expected = model(x[None]).argmax(1)[0].numpy()
    np.testing.assert_array_equal(deeplab.predict(model, image), expected)
    np.testing.assert_array_equal(deeplab.predict(model, chip), expected)
