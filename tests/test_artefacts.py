"""What the runtimes build from a model, kept on disk and loaded by a later process (`deeplab.deploy.artefacts`), and
one process timing the runtimes while the others wait for its choice (`deeplab.deploy.choice.choosing`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deeplab import ModelConfig, build_model
from deeplab.deploy.choice import cache_dir
from deeplab.deploy.runners import missing_runtime
from deeplab.deploy.runtimes import AutoRuntime, optimize_for_inference

ORT = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'deeplab[onnx]'")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny() -> torch.nn.Module:
    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.25, num_classes=3, output_stride=16, decoder=False,
                      atrous_rates=(2,), aspp_channels=16)
    torch.manual_seed(0)
    return build_model(cfg, class_names=["a", "b", "c"]).eval()


def _needs(runtime: str) -> None:
    why = missing_runtime(runtime)
    if why:
        pytest.skip(why)


def _counting(monkeypatch) -> dict[str, int]:
    """How many ONNX exports, OpenVINO compiles and TF Lite graphs this process makes from here on."""
    import deeplab.deploy.export as export
    import deeplab.deploy.litert as litert

    calls = {"export": 0, "compile": 0, "tflite": 0}

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(export, "export_onnx", counted("export", export.export_onnx))
    monkeypatch.setattr(litert, "tflite_bytes", counted("tflite", litert.tflite_bytes))
    if missing_runtime("openvino") is None:
        import openvino as ov

        monkeypatch.setattr(ov.Core, "compile_model", counted("compile", ov.Core.compile_model))
    return calls


def _run(model, runtime: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return optimize_for_inference(model, runtime=runtime, example=x)(x)


@pytest.mark.parametrize("runtime, built", [("onnxruntime", {"export": 1}), ("openvino", {"export": 1, "compile": 1}),
                                            ("tflite", {"tflite": 1})])
def test_a_later_process_loads_what_the_first_built_and_computes_the_same_bytes(monkeypatch, runtime, built):
    _needs(runtime)
    calls = _counting(monkeypatch)
    model, x = tiny(), torch.randn(1, 3, 45, 61)
    first = _run(model, runtime, x)
    assert {k: v for k, v in calls.items() if v} == built
    again = _run(tiny(), runtime, x)  # the same weights, built again: as a second process would
    assert {k: v for k, v in calls.items() if v} == built  # nothing exported, compiled or written again
    assert torch.equal(again, first)
    other = tiny()
    with torch.no_grad():
        other.classifier.weight.add_(0.1)  # other weights: their own entries
    _run(other, runtime, x)
    assert sum(calls.values()) == 2 * sum(built.values())


def test_an_exported_file_run_by_openvino_has_its_compiled_models_kept_under_its_bytes(monkeypatch, tmp_path):
    _needs("openvino")
    from deeplab.deploy.export import export_model
    from deeplab.deploy.runners import load_exported

    export_model(tiny(), tmp_path / "m.xml", format="openvino")
    calls = _counting(monkeypatch)
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        first = load_exported(tmp_path / "m.xml")(x)
        assert torch.equal(load_exported(tmp_path / "m.xml")(x), first) and calls["compile"] == 1
        other = tiny()
        other.classifier.weight.add_(0.1)
        export_model(other, tmp_path / "m.xml", format="openvino")  # the same name, other bytes: compiled again
        before = calls["compile"]  # (export_model compiles to check the file)
        load_exported(tmp_path / "m.xml")(x)
    assert calls["compile"] == before + 1


def test_a_corrupt_stale_or_foreign_entry_is_built_again_and_replaced(monkeypatch):
    _needs("openvino")
    import deeplab.deploy.artefacts as artefacts

    calls = _counting(monkeypatch)
    model, x = tiny(), torch.randn(1, 3, 45, 61)
    reference = _run(model, "openvino", x)
    root = cache_dir() / "runtime-artefacts"
    for name in ("model.bin", "compiled.blob"):  # same size, one byte changed: OpenVINO itself would load both
        path, = root.glob(f"*/{name}")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    assert torch.equal(_run(model, "openvino", x), reference)
    assert calls == {"export": 2, "compile": 2, "tflite": 0}
    assert torch.equal(_run(model, "openvino", x), reference) and calls["export"] == 2  # replaced by good entries

    manifest, _ = sorted(root.glob("*/manifest.json"))  # an entry whose manifest names another key: not read
    entry = json.loads(manifest.read_text())
    entry["key"]["model"] = "0" * 32
    manifest.write_text(json.dumps(entry))
    assert torch.equal(_run(model, "openvino", x), reference) and calls["export"] + calls["compile"] == 5

    monkeypatch.setattr(artefacts, "code_digest", lambda: "edited")  # other code: other keys, nothing old is read
    assert torch.equal(_run(model, "openvino", x), reference) and calls["export"] + calls["compile"] == 7
    assert not list(root.glob(".*partial"))


def test_a_cache_folder_that_cannot_be_written_only_costs_the_build(monkeypatch, tmp_path):
    calls = _counting(monkeypatch)
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("DEEPLAB_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    model, x = tiny(), torch.randn(1, 3, 45, 61)
    first = _run(model, "onnxruntime", x)
    assert torch.equal(_run(model, "onnxruntime", x), first) and calls["export"] == 2
    auto = AutoRuntime(model, candidates=[("torch", "fp32"), ("onnxruntime", "fp32")])  # no lock, no choice kept
    with torch.no_grad():
        assert torch.allclose(auto(x), model(x), atol=1e-4) and auto.choice["cached"] is False


def test_the_least_recently_used_entries_go_when_the_cache_outgrows_its_bound(monkeypatch):
    import deeplab.deploy.artefacts as artefacts

    monkeypatch.setattr(artefacts, "MAX_BYTES", 25_000)
    keys = [artefacts.artefact_key(digest=f"model{i}", kind="test") for i in range(3)]
    for when, key in zip((1000, 2000), keys):
        folder = artefacts.write_entry(key, {"file": bytes(10_000)})
        os.utime(folder / artefacts.MANIFEST, (when, when))  # written long ago, 0 before 1
    root = cache_dir() / "runtime-artefacts"
    old, young = root / ".gone.1.partial", root / ".writing.2.partial"
    for partial in (old, young):
        partial.mkdir()
    os.utime(old, (1000, 1000))  # left by a process killed while writing
    assert artefacts.read_entry(keys[0]) is not None  # used now: 1 is the least recently used
    artefacts.write_entry(keys[2], {"file": bytes(10_000)})  # three entries hold more than 25,000 bytes
    assert [artefacts.read_entry(key) is not None for key in keys] == [True, False, True]
    assert not old.exists() and young.exists()


CHILD = """
import json, sys, time
from pathlib import Path
import torch
import deeplab.deploy.runtimes as rt
from deeplab import ModelConfig, build_model

def time_rounds(entries, **kwargs):  # long enough for the other process to arrive while this one times
    time.sleep(1.5)
    return {name: [[{"onnxruntime": 5.0}.get(name, 10.0)]] * 5 for name in entries}

rt.time_rounds = time_rounds
torch.manual_seed(0)
model = build_model(ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.25, num_classes=3, output_stride=16,
                                decoder=False, atrous_rates=(2,), aspp_channels=16), class_names=["a", "b", "c"]).eval()
x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(1))
Path(sys.argv[1]).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.01)
auto = rt.AutoRuntime(model, candidates=[("torch", "fp32"), ("onnxruntime", "fp32")])
with torch.no_grad():
    auto(x)
print(json.dumps({"label": auto.choice["label"], "cached": auto.choice["cached"]}))
"""


def test_processes_that_start_together_time_once_and_all_take_that_choice(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    go = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / f"ready{i}"), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # both choose at once, from an empty cache
    outs = [child.communicate(timeout=300) for child in children]
    assert all(child.returncode == 0 for child in children), [err[-2000:] for _, err in outs]
    choices = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(c["cached"] for c in choices) == [False, True], choices  # one timed, the other waited for it
    assert {c["label"] for c in choices} == {"onnxruntime"}
    assert len(list((cache_dir() / "runtime-choice").glob("*.json"))) == 1
