"""The HTTP service: answers, errors that name the problem, micro-batching, and the page in a browser."""

import base64
import io
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from destseg.infer import Detector  # noqa: E402
from destseg.models import model_config  # noqa: E402
from destseg.serve import create_app  # noqa: E402
from destseg.train import DataSource, TrainOptions, train  # noqa: E402

from conftest import make_mvtec, needs_chromium, served_page  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = make_mvtec(tmp_path_factory.mktemp("data"), n_train=10)
    run = tmp_path_factory.mktemp("runs") / "run"
    cfg = model_config("destseg", teacher="efficientnet_lite0", image_size=64, batch_size=2, steps=3, student_steps=2)
    train(run, "destseg", cfg, DataSource(str(root), "widget"), options=TrainOptions(progress=False))
    return run


def png_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


IMAGE = png_bytes(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))


def huge_header_png(w=20000, h=20000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def client(run_dir):
    app = create_app(Detector.load(run_dir, precision="fp32"), max_batch=8, max_wait_ms=50, max_bytes=200_000)
    with TestClient(app) as c:
        yield c


def test_health_reports_the_run_and_its_threshold(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"] == "destseg" and h["image_size"] == 64
    assert h["threshold"] is not None and h["threshold_source"] == "good_images"


def test_predict_raw_body_and_multipart(client):
    r = client.post("/predict?overlay=true&mask=true", content=IMAGE, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    j = r.json()
    assert isinstance(j["score"], float) and j["decision"] in ("ok", "defect") and (j["width"], j["height"]) == (100, 80)
    assert {"decode", "queue_ms", "infer_ms", "total"} <= set(j["timing_ms"])
    for key in ("overlay_png", "mask_png"):  # at the upload's size by default, the model's on request
        assert Image.open(io.BytesIO(base64.b64decode(j[key]))).size == (100, 80)
    small = client.post("/predict?mask=true&output_size=model", content=IMAGE,
                        headers={"content-type": "image/png"}).json()
    assert Image.open(io.BytesIO(base64.b64decode(small["mask_png"]))).size == (64, 64)
    bad = client.post("/predict?output_size=big", content=IMAGE, headers={"content-type": "image/png"})
    assert bad.status_code == 400 and "output_size" in bad.json()["error"]
    m = client.post("/predict", files={"file": ("part.png", IMAGE, "image/png")}).json()
    assert m["score"] == pytest.approx(j["score"], abs=1e-6)
    # A threshold in the request decides; the run's threshold is unchanged.
    low = client.post("/predict?threshold=-1", content=IMAGE, headers={"content-type": "image/png"}).json()
    assert low["decision"] == "defect" and low["threshold_source"] == "request"


@pytest.mark.parametrize("body, ctype, status, words", [
    (b"", "image/png", 400, "empty body"),
    (b"this is not an image", "image/png", 400, "not an image"),
    (IMAGE[: len(IMAGE) // 2], "image/png", 400, "truncated"),
    (IMAGE, "text/plain", 415, "content type 'text/plain'"),
    (IMAGE, None, 415, "content type 'none'"),
    (b"\0" * 300_000, "image/png", 413, "more than the 200,000"),
    (huge_header_png(), "image/png", 413, "too large"),
])
def test_bad_requests_get_a_4xx_that_names_the_problem_and_service_keeps_serving(client, body, ctype, status, words):
    headers = {"content-type": ctype} if ctype else {}
    r = client.post("/predict", content=body, headers=headers)
    assert r.status_code == status and words in r.json()["error"], r.text
    assert client.post("/predict", content=IMAGE, headers={"content-type": "image/png"}).status_code == 200


def test_multipart_without_a_file_field(client):
    r = client.post("/predict", data={"note": "no file"}, files={})
    assert r.status_code in (400, 415)
    r = client.post("/predict", files={"other": ("x.txt", b"hello", "text/plain")})
    assert r.status_code == 400 and "not an image" in r.json()["error"]


def test_concurrent_requests_are_micro_batched(client):
    def one(_):
        return client.post("/predict", content=IMAGE, headers={"content-type": "image/png"}).json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    assert all(r["decision"] in ("ok", "defect") for r in results)
    assert max(r["batch_size"] for r in results) > 1
    assert len({round(r["score"], 5) for r in results}) == 1  # batching does not change the answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_refuses_bad_flags_without_traceback(run_dir, tmp_path):
    from destseg.cli import main

    assert main(["serve", "--run", str(tmp_path / "nope")]) == 2
    assert main(["serve", "--run", str(run_dir), "--port", "70000"]) == 2
    assert main(["serve", "--run", str(run_dir), "--max-batch", "0"]) == 2
    with socket.socket() as s:  # port taken
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", "--run", str(run_dir), "--port", str(s.getsockname()[1])]) == 2


@needs_chromium
def test_page_in_a_browser_uploads_an_image_and_shows_the_result(run_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with served_page(run_dir, "--precision", "fp32") as driver:
        img = tmp_path / "part.png"
        img.write_bytes(IMAGE)
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "threshold-value").get_attribute("value"))
        driver.find_element(By.ID, "file").send_keys(str(img))
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "decision").text in ("ok", "defect"))
        assert float(driver.find_element(By.ID, "score").text) >= 0
        assert driver.find_element(By.ID, "overlay").get_attribute("src").startswith("data:image/png;base64,")
        assert driver.find_element(By.ID, "name").text == "part.png"  # sent as multipart, with its name
        # Moving the threshold below the score flips the decision to defect, client-side.
        driver.execute_script("setThreshold(-1)")
        assert driver.find_element(By.ID, "decision").text == "defect"
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 0
