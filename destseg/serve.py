"""``destseg serve``: an HTTP service (FastAPI + uvicorn) around one loaded run, with micro-batching.

Endpoints: ``POST /predict`` (the image as the raw body with an ``image/*`` content type, or as the
multipart field ``file``; query ``threshold``, ``overlay``, ``mask``, ``output_size``; the answer's ``id``
names the decision), ``GET /recent`` (the last decisions, with thumbnails), ``POST /feedback`` (JSON ``{"id",
"kind"}`` with kind ``false_alarm`` or ``missed_defect``, or an image upload with query ``kind``: kept in
RUN/feedback/), ``POST /recalibrate`` (thresholds refit with the feedback, destseg.feedback; predictions go
on meanwhile), ``GET /health`` (with the thresholds in force since when, and the drift check of the recent
scores, destseg.drift), and ``GET /``, a page to drop images on and mark decisions. Concurrent requests are
gathered into batches of up to ``max_batch`` images, waiting at most ``max_wait_ms`` for the batch to fill,
and run one batch at a time. Every bad request gets a 4xx JSON ``{"error": ...}`` naming the problem; the
service keeps serving.
"""

from __future__ import annotations

import asyncio
import html
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
from PIL import Image

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
except ImportError:  # checked with a clear message in serve()
    FastAPI = Request = HTMLResponse = JSONResponse = None

from destseg.data.images import decode_rgb, hw, resize_map, resize_rgb
from destseg.drift import DriftMonitor
from destseg.errors import DestsegError, ImageError
from destseg.feedback import KINDS, add_feedback, read_feedback, recalibrate
from destseg.infer import Detector, Prediction
from destseg.thresholds import decide, in_force, utc_now
from destseg.visualize import png_b64, threshold_mask, threshold_overlay

RECALIBRATE_BATCH = 4  # images per turn on the model thread during POST /recalibrate: a request waits one turn


@dataclass
class _Job:
    image: Image.Image
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Gathers concurrent requests into batches; the model runs in one worker thread, one batch at a time."""

    def __init__(self, detector: Detector, max_batch: int = 16, max_wait_s: float = 0.005):
        self.detector, self.max_batch, self.max_wait_s = detector, max_batch, max_wait_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="destseg-model")
        self.task: asyncio.Task | None = None
        self.batches = self.images = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=False)

    async def predict(self, image: Image.Image) -> tuple[Prediction, dict]:
        job = _Job(image, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            started = time.perf_counter()
            try:
                preds = await loop.run_in_executor(self.executor, self.detector.predict_batch,
                                                   [j.image for j in batch])
            except Exception as exc:  # a model failure fails this batch's requests, not the service
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            infer_s = time.perf_counter() - started
            self.batches += 1
            self.images += len(batch)
            for j, p in zip(batch, preds):
                if not j.future.done():
                    j.future.set_result((p, {"queue_ms": 1000 * (started - j.enqueued),
                                             "infer_ms": 1000 * infer_s, "batch_size": len(batch)}))


def create_app(detector: Detector, max_batch: int = 16, max_wait_ms: float = 5.0,
               max_bytes: int = 20 * 1024 * 1024, run_name: str = "run", recent: int = 50, drift_window: int = 200):
    """The FastAPI application serving ``detector``; ``recent``: decisions kept for feedback."""
    service = _Service(detector, MicroBatcher(detector, max_batch, max_wait_ms / 1000), max_bytes, run_name,
                       recent, drift_window)

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        await service.batcher.stop()

    app = FastAPI(title="destseg", lifespan=lifespan)
    app.state.batcher = service.batcher
    app.get("/health")(service.health)
    app.get("/", response_class=HTMLResponse)(service.page)
    app.post("/predict")(service.predict)
    app.get("/recent")(service.recent_decisions)
    app.post("/feedback")(service.feedback)
    app.post("/recalibrate")(service.recalibrate)
    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _Service:
    """The endpoints of one served run."""

    def __init__(self, detector: Detector, batcher: MicroBatcher, max_bytes: int, run_name: str,
                 recent: int = 50, drift_window: int = 200):
        self.detector, self.batcher, self.max_bytes, self.run_name = detector, batcher, max_bytes, run_name
        self._set_thresholds(detector.thresholds or {})
        self.recalibrating = asyncio.Lock()  # one recalibration at a time
        self.recent: deque[dict] = deque(maxlen=recent)  # the last decisions, their image at the model's size
        calibration = detector.calibration  # the good images' scores by the engine that decides here
        self.drift = DriftMonitor(calibration["scores"] if calibration else [], window=drift_window)
        self.page_html = resources.files("destseg").joinpath("serve_page.html").read_text().replace(
            "__RUN__", html.escape(run_name))

    def _set_thresholds(self, thresholds: dict) -> None:
        self.thresholds = thresholds
        self.image_thr, self.pixel_thr = in_force(thresholds)

    async def health(self):
        d = self.detector
        feedback = read_feedback(d.run.path) if d.run else []
        drift = self.drift.state()
        return {"status": "ok", "run": self.run_name, "model": d.model_name, "teacher": d.config.teacher,
                "image_size": d.config.image_size, "device": str(d.device),
                "precision": getattr(d.model, "precision", "fp32" if d.dtype is None else "bf16"),
                "threshold": self.image_thr, "engine": d.engine, "threshold_source": self.thresholds.get("source"),
                "threshold_method": self.thresholds.get("method"), "pixel_threshold": self.pixel_thr,
                "thresholds_since": self.thresholds.get("since"),
                "feedback": {k: sum(e["kind"] == k for e in feedback) for k in KINDS},
                "drift": drift, "batches": self.batcher.batches, "images": self.batcher.images}

    async def page(self):
        return self.page_html

    async def predict(self, request: Request, threshold: float | None = None, overlay: bool = False,
                      mask: bool = False, output_size: str = "input"):
        t0 = time.perf_counter()
        if output_size not in ("input", "model"):
            return _error(400, f"output_size must be input or model (got {output_size!r})")
        if mask and self.pixel_thr is None:
            return _error(400, "the run has no pixel threshold: mask unavailable (train with this version "
                               "or run `destseg test`)")
        upload = await self._upload(request)
        if isinstance(upload, JSONResponse):
            return upload
        data, name = upload
        try:
            image = await asyncio.get_running_loop().run_in_executor(None, decode_rgb, data, name)
        except ImageError as exc:
            status = 413 if "too large" in str(exc) or "more than the" in str(exc) else 400
            return _error(status, str(exc))
        decode_ms = 1000 * (time.perf_counter() - t0)
        try:
            pred, timing = await self.batcher.predict(image)
        except Exception as exc:  # pragma: no cover - a model failure is a server error, reported as such
            return _error(500, f"inference failed: {exc}")
        thr = threshold if threshold is not None else self.image_thr
        result = {"score": pred.score, "threshold": thr, "engine": self.detector.engine,
                  "threshold_source": "request" if threshold is not None else self.thresholds.get("source"),
                  "is_defect": decide(pred.score, thr),
                  "width": image.width, "height": image.height,
                  "timing_ms": {"decode": decode_ms, **{k: v for k, v in timing.items() if k != "batch_size"}},
                  "batch_size": timing["batch_size"]}
        result["decision"] = None if thr is None else ("defect" if result["is_defect"] else "ok")
        result["id"] = self._remember(image, name, pred.score, result["decision"])
        self.drift.add(pred.score)
        if overlay or mask:  # resizing and PNG encoding off the event loop: a large frame takes a while
            out_hw = (image.height, image.width) if output_size == "input" else hw(self.detector.config.image_size)
            result.update(await asyncio.get_running_loop().run_in_executor(
                None, _images, image, pred.map, out_hw, overlay, mask, self.pixel_thr))
        result["timing_ms"]["total"] = 1000 * (time.perf_counter() - t0)
        return result

    def _remember(self, image, name: str, score: float, decision: str | None) -> str:
        key = uuid.uuid4().hex[:12]
        self.recent.append({"id": key, "name": name, "time": utc_now(), "score": score, "decision": decision,
                            "image": resize_rgb(image, self.detector.config.image_size), "feedback": None})
        return key

    async def recent_decisions(self):
        """The last decisions, newest first, each with a small thumbnail and any feedback given."""
        def row(r):
            thumb = np.asarray(Image.fromarray(r["image"]).resize((96, 96), Image.BILINEAR))
            return {**{k: v for k, v in r.items() if k != "image"}, "thumbnail_png": png_b64(thumb)}

        rows = list(self.recent)[::-1]
        return {"recent": await asyncio.get_running_loop().run_in_executor(None, lambda: [row(r) for r in rows]),
                "threshold": self.image_thr, "thresholds_since": self.thresholds.get("since")}

    async def feedback(self, request: Request, kind: str | None = None):
        """Mark a recent decision (JSON ``{"id", "kind"}``) or an uploaded image (query ``kind``)."""
        if self.detector.run is None:
            return _error(409, "this service has no run directory to keep feedback in")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                body = await request.json()
                key, kind = body["id"], body["kind"]
            except (ValueError, KeyError, TypeError):
                return _error(400, 'feedback JSON must be {"id": "...", "kind": "false_alarm" or "missed_defect"}')
            if kind not in KINDS:
                return _error(400, f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
            match = [r for r in self.recent if r["id"] == key]
            if not match:
                return _error(404, f"no recent decision with id {key!r} (the service keeps the last "
                                   f"{self.recent.maxlen}); send the image itself with ?kind=")
            r = match[0]
            image, name, score = r["image"], r["name"], r["score"]
            r["feedback"] = kind
        else:
            if kind not in KINDS:
                return _error(400, f"query kind must be one of {', '.join(KINDS)} (got {kind!r})")
            upload = await self._upload(request)
            if isinstance(upload, JSONResponse):
                return upload
            try:
                image = decode_rgb(*upload)
            except ImageError as exc:
                return _error(400, str(exc))
            name, score = upload[1], None
            if kind == "false_alarm":  # scored by the model in use, on its thread
                score = (await asyncio.wrap_future(self.batcher.executor.submit(
                    self.detector.predict_batch, [image])))[0].score
        try:
            entry = await asyncio.get_running_loop().run_in_executor(
                None, lambda: add_feedback(self.detector.run.path, image, kind, name, score, self.thresholds))
        except DestsegError as exc:  # a false alarm on an image the thresholds in force call OK
            return _error(409, str(exc))
        return entry

    async def recalibrate(self):
        """Refit the thresholds on the good images plus the false alarms; the new ones are in force at once."""
        if self.detector.run is None:
            return _error(409, "this service has no run directory to recalibrate")
        model_thread = self.batcher.executor  # the model is never run by two threads at once

        def predict(images):
            return model_thread.submit(self.detector.predict_batch, images).result()

        async with self.recalibrating:  # off the model thread, which scores its images a few at a time:
            try:  # requests that come meanwhile are answered between those batches, not after them all
                result = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: recalibrate(self.detector, predict=predict, batch=RECALIBRATE_BATCH))
            except DestsegError as exc:
                return _error(409, str(exc))
        self._set_thresholds(result["after"])
        return result

    async def _upload(self, request: Request) -> tuple[bytes, str] | JSONResponse:
        """(image bytes, name) of a raw-body or multipart upload, or the 4xx response saying what is wrong."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            body = await self._read_limited(request)
            if isinstance(body, JSONResponse):
                return body
            data, name = await _multipart_file(request, body)
            if data is None:
                return _error(400, "multipart request has no file field (send the image as field 'file')")
        elif ctype.startswith("image/") or ctype == "application/octet-stream":
            data, name = await self._read_limited(request), "upload"
            if isinstance(data, JSONResponse):
                return data
        else:
            return _error(415, f"content type '{ctype or 'none'}' is not supported: send the image as the raw "
                               "body with an image/* content type, or as multipart/form-data field 'file'")
        if not data:
            return _error(400, "empty body: no image was sent")
        return data, name

    async def _read_limited(self, request: Request) -> bytes | JSONResponse:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return _error(413, f"request body is {int(length):,} bytes, more than the {self.max_bytes:,} allowed")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > self.max_bytes:
                return _error(413, f"request body is more than the {self.max_bytes:,} bytes allowed")
            chunks.append(chunk)
        return b"".join(chunks)


def _images(image, amap: np.ndarray, out_hw: tuple[int, int], overlay: bool, mask: bool,
            pixel_thr: float | None) -> dict:
    """Base64 PNGs of the heat-map overlay and the mask at ``out_hw`` (the map resized bilinearly)."""
    out = {}
    amap = resize_map(amap, out_hw)
    if overlay:
        out["overlay_png"] = png_b64(threshold_overlay(resize_rgb(image, out_hw), amap, pixel_thr))
    if mask:
        out["mask_png"] = png_b64(threshold_mask(amap, pixel_thr))
    return out


async def _multipart_file(request, body: bytes) -> tuple[bytes | None, str]:
    """The first file part of a multipart body already read (``body``), parsed by Starlette."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, receive).form()
    for value in form.values():
        if isinstance(value, UploadFile):
            return await value.read(), value.filename or "upload"
    return None, "upload"


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", precision: str = "auto",
          max_batch: int = 16, max_wait_ms: float = 5.0, max_bytes: int = 20 * 1024 * 1024,
          backend: str = "auto", compile: str = "auto", drift_window: int = 200) -> int:
    """Load the run once and serve it until interrupted."""
    import socket

    try:
        import uvicorn

        assert FastAPI is not None
    except (ImportError, AssertionError):
        raise DestsegError("serving needs FastAPI and uvicorn: pip install 'destseg[serve]'") from None
    if not 1 <= max_batch <= 1024:
        raise DestsegError(f"--max-batch must be in [1, 1024] (got {max_batch})")
    if not 0 <= max_wait_ms <= 10_000:
        raise DestsegError(f"--max-wait-ms must be in [0, 10000] (got {max_wait_ms})")
    if not 0 < port < 65536:
        raise DestsegError(f"--port must be in [1, 65535] (got {port})")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise DestsegError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    if drift_window < 10:
        raise DestsegError(f"--drift-window must be at least 10 images (got {drift_window})")
    detector = Detector.load(run_dir, device=device, precision=precision, backend=backend, compile=compile)
    app = create_app(detector, max_batch, max_wait_ms, max_bytes, run_name=str(run_dir), drift_window=drift_window)
    thr = (detector.thresholds or {}).get("image")
    print(f"destseg: serving {run_dir} on http://{host}:{port} (threshold "
          f"{'none' if thr is None else f'{thr:.4g}'}; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
