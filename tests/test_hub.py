"""Model folders (config.json + model.safetensors + README.md): bit-identical round trips for every backbone family and
head in a fresh process that never unpickles, a stored version-1 folder that must keep loading, the CLI taking a
folder wherever it takes a checkpoint, one-line refusals of mismatched or newer folders, a malicious pickle that
never runs, and a model card the Hugging Face Hub's own parser reads."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import deeplab
from deeplab import ModelConfig, Preprocessing, build_model
from deeplab.models.checkpoint import CheckpointError, read_checkpoint, save_checkpoint

DATA = Path(__file__).parent / "data"
SRC = Path(deeplab.__file__).resolve().parent.parent


def _randomised(model):
    """`model` in eval mode with BatchNorm statistics away from the defaults, so a lost buffer changes the logits."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model.eval()


def small_model(class_names=("sky", "road", "car"), **kw):
    torch.manual_seed(0)
    if kw.get("backbone", "mobilenet_v2") in ("mobilenet_v2", "mobilenet_edgetpu"):
        kw = {"depth_multiplier": 0.5, **kw}
    cfg = ModelConfig(**{"backbone": "mobilenet_v2", "num_classes": 3, **kw})
    return _randomised(build_model(cfg, class_names=class_names))


# Every backbone family and every head, each at its smallest: (name, ModelConfig fields).
FAMILIES = [
    ("resnet-v3plus", dict(backbone="resnet18", aspp_channels=16, decoder_channels=16, low_level_channels=8)),
    ("xception-v3plus-separable", dict(backbone="xception41", separable=True, aspp_channels=16, decoder_channels=16,
                                       low_level_channels=8)),
    ("mobilenetv2-v3", dict(backbone="mobilenet_v2", depth_multiplier=0.5, decoder=False, aspp_channels=16,
                            head_conv=True)),
    ("mobilenetv3-v3plus", dict(backbone="mobilenet_v3_small", aspp_channels=16, decoder_channels=16,
                                align_corners=True)),
    ("edgetpu-v3plus", dict(backbone="mobilenet_edgetpu", depth_multiplier=0.5, aspp_channels=16,
                            decoder_channels=16)),
    ("vgg-v1-largefov", dict(backbone="vgg11", head="v1-largefov")),
    ("densenet-v2-aspp", dict(backbone="densenet121", head="v2-aspp", output_stride=8)),
    ("mobilenetv2-pointrend", dict(backbone="mobilenet_v2", depth_multiplier=0.5, pointrend=True, aspp_channels=16,
                                   decoder_channels=16, pointrend_points=64)),
]

# Run in a new interpreter: nothing of the test process (no model, no torch.load) can stand in for the folder. Any
# unpickling fails the check.
FRESH_LOADER = r"""
import json, pickle, sys
import numpy as np
import torch

def refuse(*args, **kwargs):
    raise AssertionError("a model folder was unpickled")

torch.load = pickle.load = pickle.loads = refuse
torch.set_num_threads(1)
import deeplab

x = torch.from_numpy(np.load(sys.argv[1]))
results = {}
for folder in sys.argv[2:]:
    model = deeplab.from_pretrained(folder)
    with torch.no_grad():
        out = model(x)
    expected = torch.from_numpy(np.load(folder + ".logits.npy"))
    results[folder] = bool(torch.equal(out, expected)), model.training, list(model.class_names)
print(json.dumps(results))
"""


def test_every_backbone_family_and_head_round_trips_bit_identical_in_a_fresh_process(tmp_path):
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "x.npy", x.numpy())
    folders = []
    for name, fields in FAMILIES:
        model = small_model(**fields)
        with torch.no_grad():
            np.save(tmp_path / f"{name}.logits.npy", model(x).numpy())
        folders.append(str(model.save_pretrained(tmp_path / name)))
    done = subprocess.run([sys.executable, "-c", FRESH_LOADER, str(tmp_path / "x.npy"), *folders], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert {Path(f).name: r[0] for f, r in results.items()} == {name: True for name, _ in FAMILIES}
    assert all(r[1] is False and r[2] == ["sky", "road", "car"] for r in results.values())  # eval mode, its classes


def test_a_pt_and_a_folder_load_without_random_initialisation_and_compute_the_same_bits(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(0))
    saved = []
    for name, fields in FAMILIES:
        model = small_model(**fields)
        pt = save_checkpoint(model, tmp_path / f"{name}.pt")
        saved.append((name, model, pt, model.save_pretrained(tmp_path / name)))
    calls = []

    def counted(init):
        def run(*args, **kwargs):
            tensor = args[0] if args else kwargs["tensor"]
            if not tensor.is_meta:  # on the meta device an initialiser does no work
                calls.append(init.__name__)
            return init(*args, **kwargs)
        return run

    for name in ("kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_", "trunc_normal_", "ones_", "zeros_"):
        monkeypatch.setattr(torch.nn.init, name, counted(getattr(torch.nn.init, name)))
    for name, model, pt, folder in saved:
        for loaded in (deeplab.load(pt), deeplab.from_pretrained(folder)):
            with torch.no_grad():
                assert torch.equal(loaded(x), model(x)), name
            assert not loaded.training and all(p.requires_grad for p in loaded.parameters()), name
    assert calls == []  # no memory was initialised only to be overwritten


def test_a_load_under_a_float64_default_dtype_gives_a_float64_model_as_a_copy_would(tmp_path):
    model = small_model()
    pt, folder = save_checkpoint(model, tmp_path / "m.pt"), model.save_pretrained(tmp_path / "m")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x = torch.randn(1, 3, 33, 33)
        expected = build_model(model.config, class_names=model.class_names)
        expected.load_state_dict(model.state_dict())
        for loaded in (deeplab.load(pt), deeplab.load(folder)):
            assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {torch.float64}
            with torch.no_grad():
                assert torch.equal(loaded(x), expected.eval()(x))
    finally:
        torch.set_default_dtype(default)


def test_a_tensor_no_checkpoint_holds_keeps_the_value_the_model_gives_it(tmp_path, monkeypatch):
    from deeplab.models import checkpoint

    model = small_model()
    pt = save_checkpoint(model, tmp_path / "m.pt")

    def with_buffer(cfg, **kw):  # a module computing a non-persistent buffer when built (none does today)
        built = build_model(cfg, **kw)
        built.register_buffer("scale", torch.arange(3.0) + 1, persistent=False)
        built.offset = torch.full((2,), 7.0)
        return built

    monkeypatch.setattr(checkpoint, "build_model", with_buffer)
    loaded = deeplab.load(pt)
    assert torch.equal(loaded.scale, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(loaded.offset, torch.full((2,), 7.0))
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's memory maps (/proc, Linux)")
def test_a_loaded_folder_holds_its_weights_in_memory_not_mapped_from_the_file(tmp_path):
    model = small_model()
    folder = model.save_pretrained(tmp_path / "m")
    loaded = deeplab.from_pretrained(folder)
    assert str(folder / "model.safetensors") not in Path("/proc/self/maps").read_text()
    (folder / "model.safetensors").write_bytes(b"")  # rewritten in place: a mapped model would die of SIGBUS
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_folder_written_by_format_version_1_still_loads_and_computes_what_it_did():
    # Written once by tests/data/make_hub_v1.py and stored; never written again here.
    folder = DATA / "hub-v1"
    assert json.loads((folder / "config.json").read_text())["version"] == 1
    model = deeplab.from_pretrained(folder)
    assert model.class_names == ("water", "field", "forest") and model.class_values == (1, 3, 7)
    assert model.class_colors == ((0, 0, 255), (255, 255, 0), (0, 128, 0))
    assert model.preprocessing.mean == (400.0, 500.0, 600.0, 2000.0) and model.config.in_channels == 4
    assert model.config.align_corners and model.config.rates == (2, 4, 6)
    x = torch.from_numpy(np.load(DATA / "hub-v1-input.npy"))
    expected = torch.from_numpy(np.load(DATA / "hub-v1-logits.npy"))
    with torch.no_grad():
        out = model(x)
    span = float(expected.max() - expected.min())
    assert float((out - expected).abs().max()) <= 1e-4 * span
    # The argmax wherever the top two classes are not within rounding of each other.
    top2 = expected.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * span
    assert clear.float().mean() > 0.9 and torch.equal(out.argmax(1)[clear], expected.argmax(1)[clear])


def test_a_folder_reads_into_the_dict_a_pt_gives(tmp_path):
    model = small_model(atrous_rates=(2, 4))
    model.class_colors, model.class_values = ((1, 2, 3), (4, 5, 6), (7, 8, 9)), (10, 20, 30)
    pt = save_checkpoint(model, tmp_path / "m.pt", source="official.tflite", train_config={"dataset": "voc"})
    folder = deeplab.models.checkpoint.export_folder(pt, tmp_path / "m")["path"]
    a, b = read_checkpoint(pt), read_checkpoint(folder)
    assert set(a) == set(b)
    for key in a:
        if key == "state_dict":
            assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        else:
            assert json.loads(json.dumps(a[key])) == b[key], key


def test_non_contiguous_shared_and_half_precision_tensors_are_saved_losslessly(tmp_path):
    from safetensors.torch import load_file

    from deeplab.models.hub import plain_tensors

    base = torch.arange(12.0).reshape(3, 4)
    tensors = plain_tensors({"a": base, "tied": base, "view": base.t(), "half": base.half(), "n": torch.tensor(3)})
    assert all(t.is_contiguous() for t in tensors.values()) and tensors["half"].dtype == torch.float32
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "t.safetensors")  # refuses shared or non-contiguous tensors
    back = load_file(tmp_path / "t.safetensors")
    assert torch.equal(back["view"], base.t()) and torch.equal(back["tied"], base) and int(back["n"]) == 3
    # A whole model in channels_last (every 4-D weight non-contiguous) and in half precision.
    model = small_model().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 33, 33)
    loaded = deeplab.from_pretrained(model.save_pretrained(tmp_path / "cl"))
    with torch.no_grad():  # in the same memory format, the same convolution algorithms: the same bits
        assert torch.equal(loaded.to(memory_format=torch.channels_last)(x), model(x))
    half = small_model().half()
    loaded = deeplab.from_pretrained(half.save_pretrained(tmp_path / "half"))
    assert all(torch.equal(v.float(), loaded.state_dict()[k].float()) for k, v in half.state_dict().items())


def _rewrite_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize("change,match", [
    (lambda t: t.pop("classifier.bias"), r"has no tensor classifier\.bias \(shape \(3,\)\)"),
    (lambda t: t.update(extra=torch.zeros(2)), r"holds 1 tensor\(s\) the config's model has not, first extra"),
    (lambda t: t.update({"classifier.bias": torch.zeros(4)}), r"classifier\.bias has shape \(4,\), the config's model \(3,\)"),
    (lambda t: t.update({"classifier.bias": torch.zeros(3, dtype=torch.float64)}), r"classifier\.bias is F64, the config's model F32"),
])
def test_weights_that_do_not_fit_the_config_are_refused_naming_the_first_mismatch_and_the_file(tmp_path, change, match):
    folder = small_model().save_pretrained(tmp_path / "m")
    _rewrite_weights(folder, change)
    with pytest.raises(CheckpointError, match=match) as info:
        deeplab.from_pretrained(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(folder / "model.safetensors"))


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_unknown_newer_fields_load_with_a_one_line_warning_and_a_newer_major_version_is_refused(tmp_path):
    model = small_model()
    folder = model.save_pretrained(tmp_path / "m")
    _edit_config(folder, version=1.3, tokenizer={"kind": "future"}, deeplab_version="9.0")
    with pytest.warns(UserWarning) as caught:
        loaded = deeplab.from_pretrained(folder)
    lines = [str(w.message) for w in caught]
    assert len(lines) == 1 and "\n" not in lines[0] and "tokenizer" in lines[0] and "upgrade deeplab" in lines[0]
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    _edit_config(folder, version=2)
    with pytest.raises(CheckpointError, match=r"model folder version 2 \(written by deeplab 9\.0\) is newer .*upgrade "
                                              r"deeplab"):
        deeplab.from_pretrained(folder)
    _edit_config(folder, version="two")
    with pytest.raises(CheckpointError, match="version field is 'two', not a number"):
        deeplab.load(folder)


@pytest.mark.parametrize("edit,match", [
    (dict(bands=4), r"bands is 4 but the model config says 3"),
    (dict(format="transformers"), r"not a deeplab model config \(format 'transformers'"),
    (dict(class_names=["a", "b"]), r"2 class names given for num_classes=3"),
])
def test_an_edited_config_is_refused_in_one_line(tmp_path, edit, match):
    folder = small_model().save_pretrained(tmp_path / "m")
    _edit_config(folder, **edit)
    with pytest.raises(CheckpointError, match=match) as info:
        deeplab.load(folder)
    assert "\n" not in str(info.value) and str(folder / "config.json") in str(info.value)


def test_a_folder_is_never_written_into_a_run_folder_or_over_other_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    with pytest.raises(FileExistsError, match="not a deeplab model folder"):
        small_model().save_pretrained(run)
    assert json.loads((run / "config.json").read_text()) == {"model": {}, "train": {}}
    with pytest.raises(CheckpointError, match=r"a training run folder, not a model folder; pass .*run/best \(the"):
        deeplab.load(run)  # the run folder itself where its model folder was meant
    folder = small_model().save_pretrained(tmp_path / "m")
    small_model(num_classes=3, decoder=False).save_pretrained(folder)  # a model folder: written over
    assert deeplab.load(folder).config.decoder is False


class _RunsCode:
    """Unpickling this creates `marker` (the shell command a real attack would run instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_never_runs_from_any_entry_point(tmp_path, capsys):
    from deeplab.cli import main

    marker = tmp_path / "ran"
    payload = pickle.dumps({"format": "deeplab-checkpoint", "state_dict": _RunsCode(marker)}, protocol=2)
    # The payload is live: unpickled (in another process), it does create its marker.
    control = tmp_path / "control"
    live = pickle.dumps(_RunsCode(control))
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"], input=live,
                   check=True, timeout=60)
    assert control.exists()

    raw = tmp_path / "raw.pt"
    raw.write_bytes(payload)
    zipped = tmp_path / "zipped.pt"
    torch.save({"format": "deeplab-checkpoint", "state_dict": _RunsCode(marker)}, zipped)  # torch.save's own format
    fake = small_model().save_pretrained(tmp_path / "fake")  # a valid config.json beside a pickle
    (fake / "model.safetensors").write_bytes(payload)
    bare = tmp_path / "bare"  # a folder of a pickle only, as other libraries write them
    bare.mkdir()
    (bare / "pytorch_model.bin").write_bytes(payload)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((24, 32, 3), dtype=np.uint8)).save(image)
    for path in (raw, zipped, fake, bare):
        for load in (deeplab.load, deeplab.from_pretrained):
            with pytest.raises(CheckpointError) as info:
                load(path)
            assert "\n" not in str(info.value)
        assert main(["predict", "--checkpoint", str(path), str(image), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0], err
    assert "could run code, so it is refused" in str(pytest.raises(CheckpointError, deeplab.load, zipped).value)
    assert "not a safetensors file" in str(pytest.raises(CheckpointError, deeplab.load, fake).value)
    assert not marker.exists()


def test_export_hub_then_predict_gives_byte_identical_masks_to_the_checkpoint(tmp_path, capsys):
    from PIL import Image

    from deeplab.cli import main

    pt = save_checkpoint(small_model(), tmp_path / "m.pt")
    assert main(["export", "--checkpoint", str(pt), "--format", "hub", "--out", str(tmp_path / "m")]) == 0
    line = capsys.readouterr().out
    assert "tensors read back bit-identical" in line and sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "README.md", "config.json", "model.safetensors"]
    rng = np.random.default_rng(0)
    for i, size in enumerate(((33, 47), (65, 65))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    images = [str(tmp_path / "im0.png"), str(tmp_path / "im1.png")]
    for name, checkpoint in (("from_pt", pt), ("from_folder", tmp_path / "m")):
        assert main(["predict", "--checkpoint", str(checkpoint), *images, "--out", str(tmp_path / name),
                     "--threads", "1", "--runtime", "torch"]) == 0
    for i in range(2):
        a, b = ((tmp_path / d / f"im{i}.png").read_bytes() for d in ("from_pt", "from_folder"))
        assert a == b and len(np.unique(np.asarray(Image.open(tmp_path / "from_pt" / f"im{i}.png")))) > 1


def test_the_int8_file_of_a_folder_lives_inside_it(tmp_path):
    from deeplab.deploy.quantize import int8_path

    folder = small_model().save_pretrained(tmp_path / "m")
    assert int8_path(folder) == folder / "model.int8.onnx"
    assert int8_path(tmp_path / "best.pt") == tmp_path / "best.int8.onnx"


def _card_checks(text: str):
    """The card as the Hub reads it (huggingface_hub's own parsers, offline)."""
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = hub.ModelCard(text)
    meta = card.data.to_dict()
    assert meta["library_name"] == "deeplab" and meta["pipeline_tag"] == "image-segmentation"
    assert {"semantic-segmentation", "deeplab"} <= set(meta["tags"])
    return card, meta, model_index_to_eval_results


def test_a_training_run_writes_best_as_a_model_folder_whose_card_the_hub_parses(tmp_path):
    from deeplab.training.loop import fit

    from test_train import TINY_MODEL, TINY_TRAIN

    torch.set_num_threads(1)
    init = small_model(**{k: getattr(TINY_MODEL, k) for k in ("separable", "aspp_channels", "decoder_channels",
                                                              "low_level_channels")},
                       num_classes=5, class_names=("background", "disc", "square", "ring", "cross"))
    start = init.save_pretrained(tmp_path / "init")  # --init-checkpoint takes a folder
    cfg = replace(TINY_TRAIN, steps=2, val_every=0, precise_bn_images=0, init_checkpoint=str(start))
    fit(TINY_MODEL, cfg, out_dir=tmp_path / "run", progress=False, command="deeplab train --steps 2")
    run, best = tmp_path / "run", tmp_path / "run" / "best"
    assert sorted(p.name for p in best.iterdir()) == ["README.md", "config.json", "model.safetensors", "predictions.png"]
    a, b = deeplab.load(run / "best.pt"), deeplab.from_pretrained(best)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    text = (best / "README.md").read_text()
    card, meta, to_results = _card_checks(text)
    name, results = to_results(meta["model-index"])
    final = json.loads((run / "metrics.json").read_text())
    mious = {r.metric_type: r.metric_value for r in results}
    assert name == "best" and mious["mean_iou"] == round(final["miou"], 4) and results[0].dataset_type == "synthetic"
    from huggingface_hub import metadata_load

    assert metadata_load(best / "README.md")["library_name"] == "deeplab"
    assert "deeplab train --steps 2" in text and "class pixel shares" in text and "![validation predictions]" in text
    for cls, iou in final["per_class_iou"].items():  # per-class IoU as the run measured it
        assert f"| {cls} | {'-' if iou is None else f'{100 * iou:.2f}'} |" in text
    assert "hardware" in final and f"on {final['hardware']}" in text
    # the training data's palette (the synthetic set's: VOC's first colours), not a blank, as predict draws them
    assert "| 0 | background | 0 | #000000 |" in text and "| 1 | disc | 1 | #800000 |" in text
    assert b.class_colors[:2] == ((0, 0, 0), (128, 0, 0))


def test_a_converted_models_card_names_its_source_and_agreement(tmp_path):
    model = small_model()
    pt = save_checkpoint(model, tmp_path / "c.pt", source="/models/deeplabv3_mnv2_pascal.tflite",
                         conversion={"agreement": 0.9987, "detail": "argmax on 8 images against LiteRT"})
    folder = deeplab.models.checkpoint.export_folder(pt, tmp_path / "c", license="apache-2.0")["path"]
    text = (folder / "README.md").read_text()
    _, meta, _ = _card_checks(text)
    assert meta["license"] == "apache-2.0" and "model-index" not in meta  # nothing measured: no results claimed
    assert "`deeplabv3_mnv2_pascal.tflite`" in text and "99.87%" in text
    assert json.loads((folder / "config.json").read_text())["source"] == "/models/deeplabv3_mnv2_pascal.tflite"


def test_a_repo_id_is_fetched_through_huggingface_hub_and_refused_in_one_line_offline(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    folder = small_model().save_pretrained(tmp_path / "m")
    calls = []

    def snapshot(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", snapshot)
    model = deeplab.from_pretrained("someone/tiny-deeplab", revision="v1")
    assert model.class_names == ("sky", "road", "car")
    assert calls[0][0] == "someone/tiny-deeplab" and calls[0][1]["revision"] == "v1"
    assert "model.safetensors" in calls[0][1]["allow_patterns"] and "*.bin" not in calls[0][1]["allow_patterns"]
    monkeypatch.undo()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"someone/not-cached: no such local file or folder, and as a Hub "
                       r"repo id not in the local Hugging Face cache") as info:
        deeplab.from_pretrained("someone/not-cached", cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        deeplab.from_pretrained(str(tmp_path / "missing.pt"))


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """`folder` as huggingface_hub caches a downloaded repo: models--OWNER--NAME/ with the files as blobs, a
    snapshot of links to them named by the commit, and refs/main naming that commit."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def _offline_cache(tmp_path: Path, monkeypatch) -> Path:
    """A Hugging Face cache in tmp_path, read offline by this process (huggingface_hub read its environment when
    imported, so its constants are set here)."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_predict_takes_a_repo_id_from_the_hugging_face_cache_offline(tmp_path):
    pytest.importorskip("huggingface_hub")
    from PIL import Image

    from deeplab.cli import main

    folder = small_model().save_pretrained(tmp_path / "tiny-deeplab")
    cache = tmp_path / "hf-cache"
    _hub_cache(cache, "someone/tiny-deeplab", folder)
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "deeplab", "predict", "--checkpoint", "someone/tiny-deeplab",
                           str(image), "--out", str(tmp_path / "hub"), "--quiet", "--runtime", "eager"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert main(["predict", "--checkpoint", str(folder), str(image), "--out", str(tmp_path / "local"), "--quiet",
                 "--runtime", "eager"]) == 0
    assert (tmp_path / "hub" / "a.png").read_bytes() == (tmp_path / "local" / "a.png").read_bytes()


def test_every_command_taking_a_checkpoint_takes_a_cached_repo_id(tmp_path, monkeypatch, capsys):
    from deeplab.cli import main

    cache = _offline_cache(tmp_path, monkeypatch)
    model = small_model(class_names=tuple("abcde"), num_classes=5, aspp_channels=16, decoder_channels=16)  # synthetic's
    snapshot = _hub_cache(cache, "someone/tiny-deeplab", model.save_pretrained(tmp_path / "tiny-deeplab"))
    monkeypatch.chdir(tmp_path)  # no local path of that name: the repo id is the only reading
    assert main(["export", "--checkpoint", "someone/tiny-deeplab", "--format", "hub", "--out", "copy"]) == 0
    assert (tmp_path / "copy" / "README.md").read_bytes() == (snapshot / "README.md").read_bytes()
    assert main(["benchmark", "--checkpoint", "someone/tiny-deeplab", "--runtimes", "torch", "--threads", "1",
                 "--runs", "1", "--size", "33x33", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])[0]["runtime"] == "torch"
    assert main(["eval", "--checkpoint", "someone/tiny-deeplab", "--dataset", "synthetic", "--dataset-options",
                 "length=2", "--json", "--quiet", "--runtime", "eager"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == "someone/tiny-deeplab"
    assert main(["train", "--init-checkpoint", "someone/tiny-deeplab", "--out", "run", "--dataset-options", "length=4",
                 "--batch-size", "2", "--steps", "1", "--precise-bn-images", "0", "--quiet"]) == 0
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert recorded["init_checkpoint"] == "someone/tiny-deeplab"
    assert main(["quantize", "--checkpoint", "someone/tiny-deeplab", "--images", "."]) == 2  # no --out: refused
    err = capsys.readouterr().err
    assert "a Hub repo, read from the Hugging Face cache" in err and "pass --out FILE.int8.onnx" in err
    assert sorted(p.name for p in snapshot.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_a_repo_id_missing_offline_or_without_huggingface_hub_is_one_line(tmp_path, monkeypatch, capsys):
    from deeplab.cli import main

    _offline_cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    argv = ["predict", "--checkpoint", "someone/not-cached", "a.png", "--out", "o"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("deeplab predict: error: someone/not-cached: no such local file or folder, and as a Hub repo "
                          "id not in the local Hugging Face cache") and err.count("\n") == 1
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` raise ImportError
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pip install 'deeplab[hub]'" in err and err.count("\n") == 1
    assert main(["predict", "--checkpoint", "missing-folder", "a.png", "--out", "o"]) == 2  # a bare name stays a path
    assert "missing-folder: no such checkpoint file or model folder" in capsys.readouterr().err


def test_push_to_hub_uploads_the_folder_through_hfapi(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload", kw, sorted(p.name for p in Path(kw["folder_path"]).iterdir())))
            return type("Info", (), {"commit_url": f"https://hub.example/{kw['repo_id']}/commit/1"})()

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    model = small_model()
    folder = model.save_pretrained(tmp_path / "m")
    url = deeplab.push_to_hub(folder, "someone/m", private=True, token="t")
    assert url == "https://hub.example/someone/m/commit/1"
    assert calls[1] == ("create", "someone/m", {"private": True, "exist_ok": True})
    upload = calls[2][1]
    assert upload["repo_id"] == "someone/m" and Path(upload["folder_path"]) == folder
    assert "model.safetensors" in upload["allow_patterns"] and calls[2][2] == ["README.md", "config.json",
                                                                                "model.safetensors"]
    calls.clear()
    model.push_to_hub("someone/direct")  # the model itself: through a temporary folder
    assert calls[2][2] == ["README.md", "config.json", "model.safetensors"]
    with pytest.raises(CheckpointError, match="not a deeplab model"):
        deeplab.push_to_hub(tmp_path, "someone/x")  # not a model folder: nothing is sent


def test_quantize_writes_a_folders_int8_file_inside_it_where_predict_finds_it(tmp_path, capsys):
    pytest.importorskip("onnxruntime.quantization", reason="int8 quantization needs pip install 'deeplab[onnx]'")
    from PIL import Image

    from deeplab.cli import main
    from deeplab.deploy.quantize import int8_beside

    model = small_model(aspp_channels=16, decoder_channels=16)
    folder = model.save_pretrained(tmp_path / "m")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(images / f"{i}.png")
    assert main(["quantize", "--checkpoint", str(folder), "--images", str(images), "--calibration-images", "1",
                 "--check-images", "1"]) == 0
    assert (folder / "model.int8.onnx").is_file() and int8_beside(folder, deeplab.load(folder)) == folder / "model.int8.onnx"
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(folder), str(images), "--out", str(tmp_path / "p"), "--quiet",
                 "--runtime", "onnxruntime", "--precision", "int8"]) == 0
    assert "int8 (argmax as float32 on" in capsys.readouterr().out
    deeplab.load(folder)  # the int8 file beside the weights does not disturb the folder's own check
