"""`deeplab serve`: the batcher on hand-made batches, the API in process and over real sockets, the bad-request
corpus, backpressure, SIGTERM, access control, the served mask against `deeplab predict`'s file, and the page in a
real browser (headless Chromium from the system's packages, driven by Playwright; skipped where there is none)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette", reason="deeplab serve needs the [serve] extra: pip install 'deeplab[serve]'")
pytest.importorskip("uvicorn", reason="deeplab serve needs the [serve] extra: pip install 'deeplab[serve]'")
httpx = pytest.importorskip("httpx", reason="the service's tests talk HTTP through httpx (the [test] extra)")

from starlette.testclient import TestClient  # noqa: E402

from deeplab.cli import main  # noqa: E402
from deeplab.inference.options import InferenceOptions  # noqa: E402
from deeplab.inference.predict import predict_probs, predict_probs_batch  # noqa: E402
from deeplab.models.checkpoint import save_checkpoint  # noqa: E402
from deeplab.models.config import ModelConfig, Preprocessing  # noqa: E402
from deeplab.models.model import build_model  # noqa: E402
from deeplab.serve import ServeSettings, Service, create_app  # noqa: E402
from deeplab.serve.batcher import Batcher, QueueFull  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TFLITE = SHARED / "models" / "deeplabv3-mnv2-dm05-voc" / "deeplabv3_257_mv_gpu.tflite"
VOC_SAMPLES = SHARED / "data" / "voc-samples"


def tiny_model(num_classes: int = 3, *, input_size=None):
    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.25, num_classes=num_classes, output_stride=16,
                      decoder=False, atrous_rates=(2,), aspp_channels=16)
    torch.manual_seed(0)
    pre = Preprocessing(input_size=input_size) if input_size else None
    return build_model(cfg, class_names=[f"c{i}" for i in range(num_classes)], preprocessing=pre).eval()


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def photo(h: int = 40, w: int = 50, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def service(model=None, **settings) -> Service:
    settings.setdefault("warmup_size", (33, 33))
    return Service(model if model is not None else tiny_model(), options=InferenceOptions(runtime="eager"),
                   settings=ServeSettings(name="tiny", **settings))


@contextlib.contextmanager
def client(svc: Service):
    with TestClient(create_app(svc)) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, c.get("/readyz").json()
            time.sleep(0.02)
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(svc: Service):
    """The app under a real uvicorn on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not come up"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


# -- the batcher, on hand-made work ----------------------------------------------------------------------------------


def run_batcher(coro_fn, **kw):
    async def go():
        calls: list[list] = []

        def run(items):
            calls.append(list(items))
            if any(i == "bad" for i in items):
                raise ValueError("bad item")
            return [f"done {i}" for i in items]

        b = Batcher(run, **kw)
        await b.start()
        try:
            return await coro_fn(b), calls
        finally:
            await b.stop()

    return asyncio.run(go())


def test_batcher_runs_requests_arriving_together_as_one_batch_up_to_max_batch_and_keeps_keys_apart():
    async def go(b):
        return await asyncio.gather(*(b.submit(i, key=i % 2) for i in range(10)))

    results, calls = run_batcher(go, max_batch=4, wait_s=0.05)
    assert results == [f"done {i}" for i in range(10)]
    assert all(len(c) <= 4 for c in calls) and sum(map(len, calls)) == 10
    assert all(len({i % 2 for i in c}) == 1 for c in calls)  # one key per batch
    assert max(map(len, calls)) == 4  # they did wait for company


def test_batcher_waits_for_company_only_while_requests_are_on_their_way():
    async def lone(b):
        t0 = time.perf_counter()
        result = await b.submit("x", key=0)
        return result, time.perf_counter() - t0

    (result, seconds), calls = run_batcher(lone, max_batch=8, wait_s=2.0, arriving=lambda: 0)
    assert result == "done x" and seconds < 1.0 and calls == [["x"]]  # nobody on the way: no 2 s wait
    (result, seconds), _ = run_batcher(lone, max_batch=8, wait_s=0.3, arriving=lambda: 1)
    assert seconds >= 0.29  # one on its way that never comes: the batch waits its window, then runs


def test_batcher_refuses_past_max_queue_at_once_and_a_bad_item_fails_alone():
    async def full(b):
        tasks = [asyncio.create_task(b.submit(i, key=0)) for i in range(3)]
        await asyncio.sleep(0)  # all three wait (the worker sleeps on its 1 s window)
        with pytest.raises(QueueFull):
            await b.submit(99, key=0)
        return await asyncio.gather(*tasks)

    results, _ = run_batcher(full, max_batch=8, wait_s=0.2, max_queue=3)
    assert results == ["done 0", "done 1", "done 2"]

    async def mixed(b):
        return await asyncio.gather(*(b.submit(i, key=0) for i in ("a", "bad", "c")), return_exceptions=True)

    results, calls = run_batcher(mixed, max_batch=8, wait_s=0.05)
    assert results[0] == "done a" and results[2] == "done c"
    assert isinstance(results[1], ValueError)
    assert calls[0] == ["a", "bad", "c"] and ["a"] in calls and ["c"] in calls  # the batch, then one by one


def test_batched_probabilities_equal_each_image_alone_for_fixed_and_native_sizes():
    fixed = tiny_model(input_size=(65, 65))
    images = [photo(40, 50, 1), photo(97, 33, 2), photo(65, 65, 3)]
    opts = InferenceOptions(runtime="eager")
    together = list(predict_probs_batch(fixed, images, options=InferenceOptions.of(opts, input_size=(65, 65))))
    for image, probs in zip(images, together):
        alone = predict_probs(fixed, image, options=opts)
        assert probs.shape == alone.shape == (3, *image.shape[:2])
        np.testing.assert_allclose(probs, alone, atol=1e-5)
        assert (probs.argmax(0) == alone.argmax(0)).all()
    native = tiny_model()
    same = [photo(48, 40, 4), photo(48, 40, 5)]
    together = list(predict_probs_batch(native, same, options=InferenceOptions(input_size=None)))
    for image, probs in zip(same, together):
        np.testing.assert_allclose(probs, predict_probs(native, image, input_size=None), atol=1e-5)
    with pytest.raises(ValueError, match="one network input size"):
        list(predict_probs_batch(native, [photo(48, 40), photo(40, 48)], options=InferenceOptions(input_size=None)))


# -- the API ------------------------------------------------------------------------------------------------------------


def test_segment_answers_the_mask_png_json_and_overlay_and_describes_the_model():
    image = photo()
    with client(service()) as c:
        png = c.post("/v1/segment", files={"image": ("a.png", png_bytes(image), "image/png")})
        raw = c.post("/v1/segment", content=png_bytes(image), headers={"content-type": "image/png"})
        assert png.status_code == raw.status_code == 200 and png.content == raw.content
        timing = dict(re.findall(r"(\w+);dur=([\d.]+)", raw.headers["server-timing"]))
        assert list(timing) == ["read", "decode", "queue", "model", "encode", "total"]
        assert float(timing["total"]) >= float(timing["model"]) > 0
        mask = np.asarray(Image.open(io.BytesIO(png.content)))
        assert Image.open(io.BytesIO(png.content)).mode == "P" and mask.shape == image.shape[:2]
        data = c.post("/v1/segment?format=json&overlay=1", content=png_bytes(image)).json()
        assert base64.b64decode(data["mask"]) == png.content
        assert (data["height"], data["width"]) == image.shape[:2] and data["classes"] == {"0": "c0", "1": "c1", "2": "c2"}
        shares = {f"c{k}": float((mask == k).mean()) for k in range(3) if (mask == k).any()}
        assert data["shares"] == pytest.approx(shares, abs=1e-6) and sum(data["shares"].values()) == pytest.approx(1)
        over = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["overlay"]))))
        assert over.shape == image.shape
        direct = c.post("/v1/segment?overlay=1&alpha=0.5", content=png_bytes(image))
        assert direct.content == base64.b64decode(data["overlay"])
        info = c.get("/v1/model").json()
        assert [k["name"] for k in info["classes"]] == ["c0", "c1", "c2"] and info["classes"][1]["color"] == [128, 0, 0]
        assert info["runtime"].startswith("eager") and info["ready"] is True
        flipped = c.post("/v1/segment?scales=0.75,1.0&flip=1", content=png_bytes(image))
        assert flipped.status_code == 200
        assert c.get("/healthz").json() == {"status": "alive"}


def test_metrics_count_requests_by_status_and_batch_sizes_in_prometheus_text():
    with client(service()) as c:
        for _ in range(3):
            assert c.post("/v1/segment", content=png_bytes(photo())).status_code == 200
        assert c.post("/v1/segment", content=b"").status_code == 400
        text = c.get("/metrics").text
    assert 'deeplab_requests_total{route="/v1/segment",status="200"} 3' in text
    assert 'deeplab_requests_total{route="/v1/segment",status="400"} 1' in text
    assert 'deeplab_request_seconds_count 4' in text
    assert 'deeplab_batch_size_count 4' in text  # the warm-up's batch and the three requests
    assert 'deeplab_batch_size_bucket{le="+Inf"} 4' in text and "deeplab_queue_depth 0" in text


def test_warm_up_runs_one_image_then_a_full_batch_before_ready_so_memory_is_sized_before_the_first_request():
    svc = service(max_batch=4)
    sizes: list[int] = []
    run = svc.batcher.run_batch
    svc.batcher.run_batch = lambda jobs: (sizes.append(len(jobs)), run(jobs))[1]
    with client(svc) as c:
        assert sizes == [1, 4]
        assert c.post("/v1/segment", content=png_bytes(photo())).status_code == 200
    assert sizes == [1, 4, 1]


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG that declares width x height greyscale pixels and holds a few compressed rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def bad_requests() -> list[tuple[str, str, dict, int]]:
    """(method, path, httpx keyword arguments, expected status): at least 30 ways to send the wrong thing."""
    good = png_bytes(photo())
    jpeg = io.BytesIO()
    Image.fromarray(photo(64, 64)).save(jpeg, "JPEG")
    uint8 = {"name": "image", "datatype": "UINT8", "shape": [2, 2, 3], "data": [0] * 12}
    v2 = "/v2/models/tiny/infer"
    return [
        ("POST", "/v1/segment", {"content": b""}, 400),
        ("POST", "/v1/segment", {"content": good[: len(good) // 2]}, 400),
        ("POST", "/v1/segment", {"content": jpeg.getvalue()[:300]}, 400),
        ("POST", "/v1/segment", {"content": _bomb_png(100_000, 100_000)}, 413),
        ("POST", "/v1/segment", {"content": _bomb_png(8000, 8000)}, 413),
        ("POST", "/v1/segment", {"content": b"GIF89a" + b"\x00" * 20}, 400),
        ("POST", "/v1/segment", {"content": b"hello, world", "headers": {"content-type": "text/plain"}}, 415),
        ("POST", "/v1/segment", {"content": b"\x00\x01\x02\x03" * 50}, 415),
        ("POST", "/v1/segment", {"content": b"%PDF-1.4 not an image"}, 415),
        ("POST", "/v1/segment", {"json": {"image": "a.png"}}, 415),
        ("POST", "/v1/segment", {"files": {"picture": ("a.png", good, "image/png")}}, 400),
        ("POST", "/v1/segment", {"data": {"image": "just text"}}, 415),
        ("POST", "/v1/segment", {"files": {"image": ("a.txt", b"text", "text/plain")}}, 415),
        ("POST", "/v1/segment", {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}}, 400),
        ("POST", "/v1/segment", {"content": b"x" * 3_000_000}, 413),
        ("POST", "/v1/segment", {"content": iter([b"x" * 1_000_000] * 3)}, 413),  # chunked: no Content-Length
        ("POST", "/v1/segment?format=xml", {"content": good}, 400),
        ("POST", "/v1/segment?overlay=2", {"content": good}, 400),
        ("POST", "/v1/segment?alpha=3", {"content": good}, 400),
        ("POST", "/v1/segment?alpha=half", {"content": good}, 400),
        ("POST", "/v1/segment?scales=a,b", {"content": good}, 400),
        ("POST", "/v1/segment?scales=0", {"content": good}, 400),
        ("POST", "/v1/segment?scales=-1,1", {"content": good}, 400),
        ("POST", "/v1/segment?flip=maybe", {"content": good}, 400),
        ("POST", "/v1/segment?flp=1", {"content": good}, 400),
        ("GET", "/v1/segment", {}, 405),
        ("GET", "/v1/nothing", {}, 404),
        ("POST", v2, {"content": b"not json"}, 400),
        ("POST", v2, {"json": {"outputs": []}}, 400),
        ("POST", v2, {"json": {"inputs": [{**uint8, "name": "input"}]}}, 400),
        ("POST", v2, {"json": {"inputs": [{**uint8, "datatype": "FP32"}]}}, 400),
        ("POST", v2, {"json": {"inputs": [{**uint8, "shape": [2, 2]}]}}, 400),
        ("POST", v2, {"json": {"inputs": [{**uint8, "data": [0] * 5}]}}, 400),
        ("POST", v2, {"json": {"inputs": [{**uint8, "data": [300] * 12}]}}, 400),
        ("POST", v2, {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}}, 400),
        ("POST", v2, {"json": {"inputs": [{**uint8, "shape": [9000, 9000, 3], "data": [0]}]}}, 413),
        ("POST", "/v2/models/other/infer", {"json": {"inputs": [uint8]}}, 404),
        ("GET", "/v2/models/tiny/versions/7", {}, 404),
    ]


def test_a_corpus_of_bad_requests_each_gets_its_4xx_and_a_sentence_and_the_server_goes_on():
    corpus = bad_requests()
    assert len(corpus) >= 30
    with client(service(max_bytes=2 * 2**20, max_pixels=4_000_000)) as c:
        for method, path, kwargs, status in corpus:
            r = c.request(method, path, **kwargs)
            assert r.status_code == status, (path, kwargs.keys(), r.status_code, r.text)
            message = r.json()["error"]
            assert isinstance(message, str) and 10 < len(message) < 400 and "\n" not in message, message
        assert c.post("/v1/segment", content=png_bytes(photo())).status_code == 200
        assert c.get("/readyz").status_code == 200


def test_an_exception_in_one_request_is_its_own_500_and_the_others_in_its_batch_succeed():
    model = tiny_model()
    forward = model.forward

    def fragile(x):  # a white image (normalised mean ~2.4, the others below 0) makes the network raise
        if bool((x.flatten(1).mean(1) > 1.8).any()):
            raise RuntimeError("poisoned input")
        return forward(x)

    model.forward = fragile
    poison = np.full((33, 33, 3), 255, np.uint8)
    svc = service(model, max_batch=4, batch_wait_ms=200)

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            bodies = [png_bytes(photo(33, 33, i) // 64) for i in range(3)] + [png_bytes(poison)]
            return await asyncio.gather(*(c.post("/v1/segment", content=b) for b in bodies))

    with serving(svc) as url:
        answers = asyncio.run(go(url))
        assert [a.status_code for a in answers] == [200, 200, 200, 500]
        assert "poisoned input" in answers[3].json()["error"]
        assert httpx.get(url + "/readyz").status_code == 200


def test_past_max_queue_clients_get_503_with_retry_after_and_nothing_else_is_lost():
    model = tiny_model()
    forward = model.forward
    gate = threading.Event()
    gate.set()  # open for the warm-up

    def held(x):  # the model holds its batch until the test opens the gate
        gate.wait(60)
        return forward(x)

    model.forward = held
    svc = service(model, max_batch=1, max_queue=2, batch_wait_ms=0)

    async def until(condition):
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            post = lambda i: asyncio.create_task(c.post("/v1/segment", content=png_bytes(photo(seed=i))))  # noqa: E731
            gate.clear()
            first = post(0)
            await until(lambda: svc.batcher.running == 1)  # the model holds one
            queued = [post(1), post(2)]
            await until(lambda: svc.batcher.depth == 2)  # two wait: the queue is full
            refused = await asyncio.gather(*(post(i) for i in range(3, 6)))  # answered at once, the model still held
            gate.set()
            return [await first, *[await q for q in queued]], refused

    with serving(svc) as url:
        served, refused = asyncio.run(go(url))
        metrics = httpx.get(url + "/metrics").text
    assert [a.status_code for a in served] == [200, 200, 200]
    assert [a.status_code for a in refused] == [503, 503, 503]
    assert all(a.headers["retry-after"] == "1" and "busy" in a.json()["error"] for a in refused)
    assert 'route="/v1/segment",status="503"} 3' in metrics and 'route="/v1/segment",status="200"} 3' in metrics


def test_api_key_guards_the_api_but_not_the_health_checks_and_cors_is_off_unless_asked():
    with client(service(api_key="s3cret")) as c:
        assert c.post("/v1/segment", content=png_bytes(photo())).status_code == 401
        wrong = c.get("/v1/model", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "not this service's" in wrong.json()["error"]
        assert c.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/").status_code == 200
        r = c.get("/v1/model", headers={"Origin": "https://a.example", "Authorization": "Bearer s3cret"})
        assert "access-control-allow-origin" not in r.headers
    with client(service(cors=("https://a.example",))) as c:
        r = c.get("/v1/model", headers={"Origin": "https://a.example"})
        assert r.headers["access-control-allow-origin"] == "https://a.example"


def test_open_inference_protocol_v2_metadata_ready_and_infer_as_uint8_and_bytes():
    image = photo(24, 30)
    with client(service()) as c:
        expected = np.asarray(Image.open(io.BytesIO(c.post("/v1/segment", content=png_bytes(image)).content)))
        assert c.get("/v2").json()["name"] == "deeplab"
        assert c.get("/v2/health/ready").json() == {"ready": True}
        meta = c.get("/v2/models/tiny").json()
        assert meta["inputs"][0]["name"] == "image" and meta["outputs"][0]["name"] == "mask"
        assert c.get("/v2/models/tiny/versions/1/ready").status_code == 200
        tensor = {"name": "image", "datatype": "UINT8", "shape": [24, 30, 3], "data": image.tolist()}
        out = c.post("/v2/models/tiny/infer", json={"id": "r1", "inputs": [tensor]}).json()
        assert out["id"] == "r1" and out["outputs"][0]["shape"] == [24, 30]
        assert (np.array(out["outputs"][0]["data"]).reshape(24, 30) == expected).all()
        files = [base64.b64encode(png_bytes(image)).decode()] * 2
        out = c.post("/v2/models/tiny/infer", json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                                                "data": files}]}).json()
        assert out["outputs"][0]["shape"] == [2, 24, 30]
        assert (np.array(out["outputs"][0]["data"]).reshape(2, 24, 30) == expected).all()


# -- the command --------------------------------------------------------------------------------------------------------


def test_binding_another_address_without_a_key_warns_and_the_flags_reach_uvicorn(tmp_path, monkeypatch, capsys):
    import uvicorn

    ckpt = save_checkpoint(tiny_model(), tmp_path / "m.pt")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    assert main(["serve", "--checkpoint", str(ckpt), "--host", "0.0.0.0", "--port", "9999", "--runtime", "eager"]) == 0
    err = capsys.readouterr().err
    assert "without an API key" in err and "DEEPLAB_API_KEY" in err
    assert seen["host"] == "0.0.0.0" and seen["port"] == 9999
    monkeypatch.setenv("DEEPLAB_API_KEY", "k")
    assert main(["serve", "--checkpoint", str(ckpt), "--host", "0.0.0.0", "--runtime", "eager"]) == 0
    assert "without an API key" not in capsys.readouterr().err


def test_serve_takes_a_model_folder_and_names_the_model_after_it(tmp_path, monkeypatch):
    import uvicorn

    tiny_model().save_pretrained(tmp_path / "roads-v2")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    assert main(["serve", "--checkpoint", str(tmp_path / "roads-v2"), "--runtime", "eager"]) == 0
    with TestClient(seen["app"]) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.get("/v1/model").json()["name"] == "roads-v2"
        assert c.get("/v2/models/roads-v2/ready").status_code == 200


def _start_cli_server(ckpt: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deeplab", "serve", "--checkpoint", str(ckpt), "--port", str(port),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"deeplab serve did not come up: {proc.communicate()}")
        time.sleep(0.1)


def test_sigterm_finishes_the_requests_in_flight_then_exits_0_and_a_slow_client_gets_408(tmp_path):
    ckpt = save_checkpoint(tiny_model(), tmp_path / "m.pt")
    proc, url = _start_cli_server(ckpt, "--runtime", "eager", "--max-batch", "1", "--read-timeout", "0.5")
    try:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:  # a client that stalls
            s.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
            answer = b""
            while not answer.endswith(b"}") and (part := s.recv(4096)):
                answer += part
            answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive" in answer
        big = png_bytes(photo(600, 800))

        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                tasks = [asyncio.create_task(c.post("/v1/segment", content=big)) for _ in range(6)]
                while True:  # every request has arrived (answered, or decoded and with the model); most still wait
                    text = (await c.get("/metrics")).text
                    done = re.search(r'route="/v1/segment",status="200"\} (\d+)', text)
                    if int(re.search(r"deeplab_in_flight (\d+)", text).group(1)) + int(done.group(1) if done else 0) == 6:
                        break
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        answers = asyncio.run(go())
        assert [a.status_code for a in answers] == [200] * 6
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.skipif(not TFLITE.is_file(), reason=f"{TFLITE} absent (the official model, in ../shared)")
def test_served_mask_equals_deeplab_predicts_file_byte_for_byte_for_the_official_model(tmp_path):
    from deeplab.convert import convert_file

    ckpt = save_checkpoint(convert_file(TFLITE), tmp_path / "voc.pt")
    images = sorted(VOC_SAMPLES.glob("*_image.png"))[:2] or [TFLITE.parent / "reference" / "tfls_segmentation_input.jpg"]
    assert main(["predict", *map(str, images), "--checkpoint", str(ckpt), "--out", str(tmp_path / "pred"),
                 "--runtime", "torch", "--quiet"]) == 0
    svc = Service(deeplab_load(ckpt), options=InferenceOptions(runtime="torch"),
                  settings=ServeSettings(name="voc", max_batch=4, batch_wait_ms=100))

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:  # together: they share one batch
            return await asyncio.gather(*(c.post("/v1/segment", content=p.read_bytes()) for p in images))

    with serving(svc) as url:
        answers = asyncio.run(go(url))
        alone = [httpx.post(url + "/v1/segment", content=p.read_bytes(), timeout=120) for p in images]
    assert max(int(a.headers["x-batch"]) for a in answers) > 1
    for image, together, single in zip(images, answers, alone):
        written = (tmp_path / "pred" / f"{image.stem}.png").read_bytes()
        assert single.content == written and together.content == written, image.name


def deeplab_load(path):
    import deeplab

    return deeplab.load(path)


# -- the page, in a real browser ----------------------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


def test_the_page_uploads_an_image_and_shows_the_overlay_mask_legend_and_an_error_as_a_sentence(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page's test drives Chromium through Playwright "
                                   "(pip install playwright)")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    image = tmp_path / "street.png"
    Image.fromarray(photo(60, 80)).save(image)
    (tmp_path / "notes.txt").write_text("not an image")
    with serving(service()) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model-line').textContent.includes('classes')")
            page.set_input_files("#file", str(image))
            page.wait_for_function("document.getElementById('overlay').src.startsWith('data:image/png')")
            rows = page.locator("#legend tbody tr")
            assert rows.count() == 3 and rows.nth(1).locator("td").nth(1).inner_text() == "c1"
            shares = [float(rows.nth(i).locator("td").nth(2).inner_text().rstrip("%")) for i in range(3)]
            assert sum(shares) == pytest.approx(100, abs=0.2)
            assert page.eval_on_selector("#mask", "img => img.naturalWidth") == 80
            assert "60 pixels in" in page.inner_text("#status") or "80 x 60" in page.inner_text("#status")
            page.set_input_files("#file", str(tmp_path / "notes.txt"))
            page.wait_for_selector("#error:not([hidden])")
            assert "not an image" in page.inner_text("#error")
        finally:
            browser.close()


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_an_exported_file_serves_what_predict_writes_for_it_batched_where_its_runtime_can(tmp_path, fmt):
    pytest.importorskip({"onnx": "onnxruntime", "tflite": "ai_edge_litert"}[fmt], reason=f"needs the {fmt} runtime")
    from deeplab.deploy.export import export_model
    from deeplab.deploy.runners import load_exported

    path = tmp_path / f"m.{fmt}"
    export_model(tiny_model(input_size=(65, 65)), path, format=fmt)
    images = []
    for i in range(3):
        images.append(tmp_path / f"in{i}.png")
        Image.fromarray(photo(40 + i, 50, i)).save(images[-1])
    assert main(["predict", *map(str, images), "--checkpoint", str(path), "--out", str(tmp_path / "pred"), "--quiet"]) == 0
    svc = Service(load_exported(path), options=InferenceOptions(), settings=ServeSettings(name="m", max_batch=4,
                                                                                          batch_wait_ms=150))

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/segment", content=p.read_bytes()) for p in images))

    with serving(svc) as url:
        answers = asyncio.run(go(url))
    assert svc.runtime.startswith({"onnx": "onnxruntime", "tflite": "tflite"}[fmt])
    # ONNX Runtime takes any batch; TF Lite graphs are static (batch 1), so that service runs one request at a time.
    assert {a.headers["x-batch"] for a in answers} == ({"3"} if fmt == "onnx" else {"1"})
    for image, answer in zip(images, answers):
        assert answer.content == (tmp_path / "pred" / f"{image.stem}.png").read_bytes()
