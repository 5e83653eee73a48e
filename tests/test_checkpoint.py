"""Checkpoints: a round trip restores everything; anything else gets one clear error; writes are atomic."""

from __future__ import annotations

import pickle

import pytest
import torch

import deeplab
from deeplab import ModelConfig, Preprocessing, build_model
from deeplab.models.checkpoint import CheckpointError, atomic_save, save_checkpoint


def small_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.5, num_classes=3, **kw)
    return build_model(cfg, class_names=["sky", "road", "car"], preprocessing=Preprocessing(input_size=(65, 65)))


def test_load_round_trip_restores_config_class_names_preprocessing_and_outputs(tmp_path):
    model = small_model(align_corners=True, atrous_rates=(2, 4))
    # Give the BatchNorms non-trivial running statistics so a lost buffer would show.
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 65, 65))
    model.eval()
    path = save_checkpoint(model, tmp_path / "m.pt", step=7)
    loaded = deeplab.load(path)
    assert not loaded.training
    assert loaded.config == model.config and loaded.config.rates == (2, 4)
    assert loaded.class_names == ("sky", "road", "car")
    assert loaded.preprocessing == model.preprocessing
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_loads_with_weights_only(tmp_path):
    path = save_checkpoint(small_model(), tmp_path / "m.pt")
    data = torch.load(path, weights_only=True)  # raises if anything but plain data were inside
    assert data["format"] == "deeplab-checkpoint" and data["model_config"]["backbone"] == "mobilenet_v2"


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "deeplab-checkpoint", "x": Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pt"):
        deeplab.load(path)


@pytest.mark.parametrize(
    "content,match",
    [(b"", "not a readable"), (b"hello, I am text\n", "not a readable"), (None, "not a deeplab checkpoint")],
)
def test_files_that_are_not_checkpoints_get_one_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"conv1.weight": torch.zeros(1)}, path)  # a bare state dict: use `deeplab convert`
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as info:
        deeplab.load(path)
    assert "bad.pt" in str(info.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        deeplab.load(tmp_path / "nope.pt")


def test_weights_of_another_class_count_list_the_mismatch(tmp_path):
    path = save_checkpoint(small_model(), tmp_path / "m.pt")
    data = torch.load(path, weights_only=True)
    data["model_config"]["num_classes"] = 5
    data["class_names"] = list("abcde")
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=r"classifier.weight: file \(3, 256, 1, 1\) vs model \(5, 256, 1, 1\)"):
        deeplab.load(path)


def test_truncated_checkpoint_is_reported(tmp_path):
    path = save_checkpoint(small_model(), tmp_path / "m.pt")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="m.pt"):
        deeplab.load(path)


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
