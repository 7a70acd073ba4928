"""OpenVINO: export a run to an IR (model.xml + model.bin) and run it as a drop-in for the PyTorch model.

The IR is converted from the run's ONNX graph (batch norms folded, dynamic batch), weights kept in fp32.
On a CPU where oneDNN runs bf16 natively (AMX, AVX-512 bf16), the default ("auto") runs it in bf16;
``precision="fp32"`` forces f32; ``precision="int8"`` runs an int8 copy quantised by NNCF (post-training,
calibrated on the run's own good training images and a synthetic-anomaly copy of each, never on test
images). A run's own IRs are cached in ``RUN/openvino/`` (``int8/`` beside) the first time they are used, and
travel with the run folder: quantise where the training images are (one ``destseg test --precision int8``),
then use the run anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from destseg.checkpoint import atomic_write_text, file_digest
from destseg.device import cpu_bf16_native
from destseg.errors import DestsegError

IR_NAME = "model.xml"
SOURCE_NAME = "source.json"  # beside a cached IR: the checkpoint it was made from


@contextlib.contextmanager
def no_telemetry():
    """OpenVINO's converter and NNCF send usage data to Intel unless told they run in CI: destseg does not let
    them (offline, their sender held the process at exit). Both read the opt-out (``CI=true``) when they make
    their telemetry object (NNCF on import, the converter per call), so it is set for that moment only."""
    before = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = before


def import_nncf():
    """NNCF, imported with its telemetry off; ImportError where it is not installed."""
    with no_telemetry():
        import nncf
    return nncf


def _ov():
    try:
        import openvino
    except ImportError:
        raise DestsegError("the OpenVINO backend needs the openvino package: pip install 'destseg[openvino]'") from None
    return openvino


def export_openvino(run_dir: Path | str, out_dir: Path | str, all_maps: bool = False) -> Path:
    """Write ``out_dir/model.xml`` and ``model.bin`` (atomically: the folder appears complete or not at all);
    ``all_maps``: with the model's secondary maps as outputs (see :func:`destseg.export.export_onnx`)."""
    from destseg.export import export_failed, export_onnx

    ov = _ov()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        onnx_path = export_onnx(run_dir, Path(tmp) / "model.onnx", all_maps=all_maps)
        try:
            with no_telemetry():
                model = ov.convert_model(str(onnx_path))
        except Exception as exc:  # the converter's own error classes (ovc Error, OpConversionFailure)
            raise export_failed(run_dir, "OpenVINO conversion of its ONNX graph", exc) from exc
        ir_dir = Path(tmp) / "ir"
        ir_dir.mkdir()
        ov.save_model(model, str(ir_dir / IR_NAME), compress_to_fp16=False)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(ir_dir, out_dir)
    return out_dir / IR_NAME


INT8_CALIBRATION_IMAGES = 300


# The recipe, which the nncf.quantize call below is made from (stored beside a cached int8 IR: a cache made by
# another recipe is quantised again).
QUANTIZATION = {"tool": "nncf.quantize", "preset": "performance", "overflow_fix": "enable", "fp32": ["teacher"],
                "calibration": "good training images, then each again with a synthetic anomaly (built-in textures)"}
FP32_SCOPE = [f".*/{module}/.*" for module in QUANTIZATION["fp32"]]  # their IR node names


def calibration_paths(run) -> list[Path]:
    """The run's good training images that calibrate its int8 copy ([] where they cannot be read here), less
    the ones its thresholds were set on (RUN/calibration.json) when some were held out of training: the
    thresholds stay set on images the model, int8 copy included, never saw."""
    try:
        paths = run.data.scan().train if run.data else []
    except DestsegError:  # the dataset folder is not on this machine
        return []
    # by path, not name: a recalibration's good test images share names (000.png) with training images
    held = {os.path.realpath(f) for f in (run.calibration() or {}).get("files", [])}
    trained = [p for p in paths if os.path.realpath(p) not in held]
    return (trained or paths)[:INT8_CALIBRATION_IMAGES]  # none left: the thresholds are on the training images


def quantize_ir(run_dir: Path | str, ir: Path, out_dir: Path, progress: bool = True) -> Path:
    """An int8 copy of the IR ``ir`` in ``out_dir`` (atomically), by NNCF's post-training quantisation with the
    run's good training images (up to ``INT8_CALIBRATION_IMAGES``) and a synthetic-anomaly copy of each as
    calibration data (see :class:`_Calibration`); ``progress`` False: without NNCF's progress bars."""
    from destseg.data.datasets import TestDataset, TestSample
    from destseg.models.backbones import backbone_spec
    from destseg.run import Run

    try:
        nncf = import_nncf()
    except ImportError:
        raise DestsegError("--precision int8 needs NNCF for the quantisation: pip install 'destseg[int8]'") from None
    run = Run(run_dir)
    paths = calibration_paths(run)
    if not paths:
        raise DestsegError(f"{run.path}: --precision int8 calibrates on the run's good training images, and the run "
                           f"records none that can be read (data: {run.record.get('data')}); quantise where they "
                           "are (`destseg test --run RUN --precision int8`) and copy the run folder with its "
                           "openvino/ folder")
    print(f"destseg: quantising {run.path} to int8 once ({len(paths)} good training images and an anomalous copy "
          f"of each calibrate it; kept in {out_dir})", file=sys.stderr, flush=True)
    cfg = run.config
    images = TestDataset([TestSample(p, 0, None, "good") for p in paths], cfg.image_size,
                         backbone_spec(cfg.teacher).normalize)
    ov = _ov()
    # overflow_fix=ENABLE: 7-bit weights in every layer, so that CPUs without VNNI (AVX2: u8 x s8 products
    # summed in 16 bits) do not saturate. NNCF's default fixes the first layer only; on bottle under an AVX2
    # cap that lost 1.0 P-AUROC and 3.8 P-AP against fp32, with the fix 0.3 and 0.6 (docs/RESULTS.md).
    # The teacher stays in fp32: its int8 features cost 0.2 P-AUROC on both bottle seeds tried, and its
    # depthwise layers gain nothing from int8 on an AVX2 CPU (docs/RESULTS.md, "int8").
    overflow_fix = nncf.OverflowFix(QUANTIZATION["overflow_fix"])
    calibration = _Calibration(images, backbone_spec(cfg.teacher).normalize,
                               gray=(run.record.get("resolved") or {}).get("anomaly_color") == "gray")
    with _nncf_to_stderr(quiet=not progress):
        quantized = nncf.quantize(ov.Core().read_model(str(ir)), nncf.Dataset(calibration),
                                  subset_size=len(calibration), preset=nncf.QuantizationPreset(QUANTIZATION["preset"]),
                                  advanced_parameters=nncf.AdvancedQuantizationParameters(overflow_fix=overflow_fix),
                                  ignored_scope=nncf.IgnoredScope(patterns=FP32_SCOPE, validate=False))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        ov.save_model(quantized, str(Path(tmp) / "ir" / IR_NAME), compress_to_fp16=False)
        (Path(tmp) / "ir" / "quantization.json").write_text(json.dumps(QUANTIZATION))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(Path(tmp) / "ir", out_dir)
    return out_dir / IR_NAME


@contextlib.contextmanager
def _nncf_to_stderr(quiet: bool = False):
    """NNCF writes its progress bars and its log (a handler bound to stdout when it was imported) to stdout,
    which ``destseg test --json`` keeps for its JSON: both go to stderr while it quantises (``quiet``: its
    progress bars nowhere, for ``--no-progress``), its INFO lines (one per layer left in fp32) are dropped,
    and all is put back after."""
    logger = logging.getLogger("nncf")
    handlers = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]
    streams, level = [h.stream for h in handlers], logger.level
    try:
        for h in handlers:
            h.stream = sys.stderr  # not setStream: it flushes the old stream, which may be closed by now
        logger.setLevel(logging.WARNING)
        with contextlib.ExitStack() as stack:
            sink = stack.enter_context(open(os.devnull, "w")) if quiet else sys.stderr  # noqa: SIM115
            stack.enter_context(contextlib.redirect_stdout(sink))
            yield
    finally:
        for h, stream in zip(handlers, streams):
            h.stream = stream
        logger.setLevel(level)


class _Calibration:
    """The calibration images as batches of one, decoded as NNCF iterates (it may pass over them more than
    once; holding them all would take 600 x 0.8 MB at 256x256): the good training images, then each again
    with a synthetic anomaly, made as in training (the built-in textures, in grey for a grey product; the
    same anomaly on every pass). Calibrated on good images alone, the ranges of the segmentation head never
    saw what an anomaly makes of its input and clipped it: one metal_plate seed lost 1.2 I-AUROC to int8,
    and with the anomalous copies 0.1 (docs/RESULTS.md, "int8")."""

    def __init__(self, images, normalize, gray: bool):
        from destseg.data.synthesis import AnomalySynthesizer  # the training's synthesis: only when quantising

        self.images, self.normalize = images, normalize
        self.mean, self.std = (torch.tensor(v).view(3, 1, 1) for v in (normalize.mean, normalize.std))
        self.synthesize = AnomalySynthesizer(images.size, None, gray=gray)

    def __len__(self) -> int:
        return 2 * len(self.images)

    def __iter__(self):
        n = len(self.images)
        for i in range(2 * n):
            x = self.images[i % n]["image"]
            if i >= n:
                img01 = (x * self.std + self.mean).clamp(0, 1).permute(1, 2, 0).numpy()
                aug, _ = self.synthesize(img01, np.random.default_rng(i))
                x = self.normalize.hwc(aug)
            yield x[None].numpy()


def _head(path: Path, n: int = 200_000) -> str:
    """The first ``n`` bytes of a text file (where an IR names its outputs), without reading the rest."""
    with open(path, "rb") as f:
        return f.read(n).decode(errors="ignore")


def _made_from(folder: Path) -> str | None:
    try:
        return json.loads((folder / SOURCE_NAME).read_text()).get("checkpoint_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _checkpoint_sha(run_dir: Path | str) -> str | None:
    """sha256 of the run's checkpoint (None where there is none): what each cached IR records it was made from
    (modification times do not survive a copy). Hashed once per version of the file, not once per question."""
    ckpt = Path(run_dir) / "checkpoint.pt"
    try:
        st = ckpt.stat()
    except OSError:
        return None
    return _file_sha(str(ckpt.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha(path: str, inode: int, size: int, mtime_ns: int) -> str:
    return file_digest(path)


def auto_int8(run_dir: Path | str, model_name: str) -> bool:
    """Whether ``--precision auto`` runs this run in int8 here: a model whose int8 accuracy was measured
    (``int8_by_default``: DeSTSeg) on a CPU without native bf16 (AVX2, AVX-512 without bf16), where int8 is the
    one engine past the yardstick (docs/BENCHMARKS.md) at fp32's accuracy (docs/RESULTS.md, "int8"), when the
    run's int8 copy is cached or can be made here (NNCF installed, the training images readable); otherwise
    fp32. On a CPU with native bf16, bf16."""
    from destseg.models import MODELS

    if cpu_bf16_native() or not getattr(MODELS.get(model_name), "int8_by_default", False):
        return False
    q = Path(run_dir) / "openvino" / "int8"
    sha = _checkpoint_sha(run_dir)
    if (q / IR_NAME).is_file() and sha is not None and _made_from(q) == sha:
        return True
    why = "this CPU has no native bf16, where this model runs fastest in int8, but "
    fp32 = "; running it in fp32 (--precision fp32 chooses that without this warning)"
    try:
        import_nncf()
    except ImportError:
        warnings.warn(why + "NNCF, which makes the int8 copy, is not installed (pip install 'destseg[int8]')" + fp32,
                      stacklevel=3)
        return False
    from destseg.run import Run

    if calibration_paths(Run(run_dir)):
        return True
    warnings.warn(why + "the run has no int8 copy and its training images, which make one, are not here (make it "
                  f"where they are: destseg test --run {shlex.quote(str(run_dir))} --precision int8, then copy the "
                  "run)" + fp32,
                  stacklevel=3)
    return False


def run_ir(run_dir: Path | str, int8: bool = False, progress: bool = True) -> Path:
    """The run's cached IR (with every map the model makes), exported on first use and again when the
    checkpoint is another one or the IR was written by an earlier version (two outputs only). Each cached IR
    records the checkpoint it was made from (``source.json``), so a run folder copied to another machine keeps
    its IRs: the int8 one above all, whose making needs the training images (``progress``: NNCF's bars)."""
    ir = Path(run_dir) / "openvino" / IR_NAME
    sha = _checkpoint_sha(run_dir)
    stale = not ir.is_file() or _made_from(ir.parent) != sha or 'name="anomaly_map"' in _head(ir)
    if stale:
        export_openvino(run_dir, ir.parent, all_maps=True)
        atomic_write_text(ir.parent / SOURCE_NAME, json.dumps({"checkpoint_sha256": sha}))
    if not int8:
        return ir
    q = ir.parent / "int8" / IR_NAME
    recipe = q.parent / "quantization.json"
    current = not stale and q.is_file() and _made_from(q.parent) == sha
    if current and (not recipe.is_file() or json.loads(recipe.read_text()) != QUANTIZATION):
        # quantised by an earlier recipe: again, where the training images are; elsewhere it is kept
        from destseg.run import Run

        if calibration_paths(Run(run_dir)):
            current = False
        else:
            warnings.warn(f"{q.parent}: quantised by an earlier recipe, and the run's training images are not "
                          "here to quantise it again: running it as it is", stacklevel=2)
    if not current:
        quantize_ir(run_dir, ir, q.parent, progress)
        atomic_write_text(q.parent / SOURCE_NAME, json.dumps({"checkpoint_sha256": sha}))
    return q


class OpenVINOModel:
    """Callable like the PyTorch model in eval mode: normalised images (N, 3, H, W) -> {"map", "score"}."""

    training = False

    def __init__(self, ir_path: Path | str, precision: str = "auto", threads: int | None = None):
        ov = _ov()
        core = ov.Core()
        config = {}
        # auto: bf16 where oneDNN runs it natively, as for PyTorch. OpenVINO's own default reads the CPU's
        # flags only, and under ONEDNN_MAX_CPU_ISA=AVX2 (an AVX2 CPU emulated on a newer one) picked bf16
        # and then could not compile the model.
        if precision in ("fp32", "int8") or (precision == "auto" and not cpu_bf16_native()):
            config["INFERENCE_PRECISION_HINT"] = "f32"  # int8: the quantised layers run in int8, the rest in f32
        elif precision == "bf16":
            caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            if "BF16" not in caps:
                raise DestsegError(f"bf16 is not supported by this CPU for OpenVINO (capabilities: {', '.join(caps)}); "
                                   "use --precision fp32 or auto")
            config["INFERENCE_PRECISION_HINT"] = "bf16"
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(str(ir_path), "CPU", config)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)  # f32 / bf16
        if precision == "int8":
            self.precision = "int8"

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self

    @property
    def map_outputs(self) -> dict[str, tuple[str, str]]:
        """The (map, score) pairs among the outputs: ``map``/``score``, and ``<prefix>map``/``<prefix>score``."""
        names = [o.get_any_name() for o in self.compiled.outputs]
        return {n[: -len("map")]: (n, n[: -len("map")] + "score") for n in names
                if n.endswith("map") and n[: -len("map")] + "score" in names}

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        result = self.compiled(x.detach().float().contiguous().cpu().numpy())
        out = {o.get_any_name(): torch.from_numpy(result[o]) for o in self.compiled.outputs}
        if "anomaly_map" in out:  # exported by ``destseg export``: two outputs
            out["map"] = out.pop("anomaly_map")
        return out
