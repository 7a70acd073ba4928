"""int8 recipes on a trained run (under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 for an AVX2 CPU): NNCF
defaults vs overflow_fix=ENABLE vs the MIXED preset, each evaluated on the run's test split through OpenVINO.

    .venv/bin/python benchmarks/int8_recipes.py RUN WORKDIR [VARIANT ...]   # RUN is copied into WORKDIR, its IR
                                                                          # exported there; default: every variant
    VARIANT: a name below, or fp32:RE1,RE2 (the IR nodes matching these regular expressions kept in fp32);
    synthetic+VARIANT: that variant calibrated on the good training images plus a synthetic-anomaly copy of each
"""
import shutil
import sys
import time
from pathlib import Path
import numpy as np
import nncf
import openvino as ov
from destseg.run import Run
from destseg.openvino_ir import run_ir
from destseg.data.datasets import TestDataset, TestSample
from destseg.models.backbones import backbone_spec
from destseg.metrics import evaluate

src = Path(sys.argv[1]); work = Path(sys.argv[2]); work.mkdir(exist_ok=True)
run_dir = work / "run"
if not run_dir.exists():
    shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns("openvino"))
run = Run(run_dir); cfg = run.config
ir = run_ir(run_dir)
norm = backbone_spec(cfg.teacher).normalize
train = run.data.scan().train[:300]
cal = TestDataset([TestSample(p, 0, None, "good") for p in train], cfg.image_size, norm)
cal_data = [cal[i]["image"][None].numpy() for i in range(len(cal))]
index = run.data.scan()
test = TestDataset(index.test, cfg.image_size, norm)
items = [test[i] for i in range(len(test))]
x = np.stack([it["image"].numpy() for it in items])
masks = np.stack([it["mask"].numpy().reshape(it["mask"].shape[-2:]) for it in items]) if "mask" in items[0] else None
labels = np.array([it["label"] for it in items])
core = ov.Core()
def metrics(model):
    c = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    maps, scores = [], []
    t = time.perf_counter()
    for i in range(0, len(x), 16):
        r = c(x[i:i+16])
        maps.append(r[c.output("map")]); scores.append(r[c.output("score")])
    dt = time.perf_counter() - t
    m = evaluate(np.concatenate(maps), masks, labels, np.concatenate(scores))
    return {k: round(100 * v, 1) for k, v in m.items() if k in ("i_auroc", "p_auroc", "p_ap", "pro", "iap", "iap90")}, round(len(x) / dt, 1)
base = core.read_model(str(ir))
print("fp32", *metrics(base), flush=True)
variants = {
    "default": {},
    "overflow_fix=enable": {"advanced_parameters": nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.ENABLE)},
    "mixed": {"preset": nncf.QuantizationPreset.MIXED},
    "mixed+overflow_fix": {"preset": nncf.QuantizationPreset.MIXED, "advanced_parameters": nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.ENABLE)},
}
# Layers kept in fp32 (NNCF's ignored scope, with the overflow fix): the segmentation network's input
# convolutions (the teacher-student products), its last 1x1 convolution, or the whole segmentation network.
fix = nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.ENABLE)
for name, patterns in {"fp32 seg. input": [".*segmentation/res/res.0/conv1/.*", ".*segmentation/res/res.0/downsample/.*"],
                       "fp32 last conv": [".*segmentation/head/head.4/.*"],
                       "fp32 seg. input + last conv": [".*segmentation/res/res.0/conv1/.*",
                                                       ".*segmentation/res/res.0/downsample/.*",
                                                       ".*segmentation/head/head.4/.*"],
                       "fp32 segmentation network": [".*segmentation/.*"],
                       "fp32 teacher": [".*/teacher/.*"],
                       "fp32 student decoder output": [".*student/decoder/layer1/.*"],
                       "fp32 teacher + student decoder output": [".*/teacher/.*", ".*student/decoder/layer1/.*"],
                       "fp32 teacher + last conv": [".*/teacher/.*", ".*segmentation/head/head.4/.*"],
                       "fp32 teacher + seg. input + last conv": [".*/teacher/.*",
                                                                  ".*segmentation/res/res.0/conv1/.*",
                                                                  ".*segmentation/res/res.0/downsample/.*",
                                                                  ".*segmentation/head/head.4/.*"],
                       "fp32 teacher + segmentation network": [".*/teacher/.*", ".*segmentation/.*"]}.items():
    variants[name] = {"advanced_parameters": fix,
                      "ignored_scope": nncf.IgnoredScope(patterns=patterns, validate=False)}
def synthetic_calibration():
    """The good training images plus a copy of each with a synthetic anomaly (the training's own synthesis,
    options from the run's record): activations of the anomalous kind are seen too."""
    from destseg.data.images import read_rgb, resize_rgb
    from destseg.data.synthesis import AnomalySynthesizer
    options, resolved = run.record.get("options", {}), run.record.get("resolved", {})
    synth = AnomalySynthesizer(cfg.image_size, options.get("texture_dir"), gray=resolved.get("anomaly_color") == "gray")
    rng = np.random.default_rng(0)
    synthetic = []
    for p in train:
        img = resize_rgb(read_rgb(p), cfg.image_size).astype(np.float32) / 255.0
        aug, _ = synth(img, rng)
        synthetic.append(norm.hwc(aug)[None].numpy())
    return cal_data + synthetic


only = sys.argv[3:]  # variant names to run (default: all)
cal_synth = synthetic_calibration() if any(name.startswith("synthetic+") for name in only) else None
for name in only:
    base_name = name[len("synthetic+"):] if name.startswith("synthetic+") else name
    if base_name.startswith("fp32:"):
        variants[base_name] = {"advanced_parameters": fix,
                               "ignored_scope": nncf.IgnoredScope(patterns=base_name[5:].split(","), validate=False)}
    if name != base_name:
        variants[name] = {**variants[base_name], "_cal": cal_synth}
for name, kw in variants.items():
    if only and name not in only:
        continue
    kw = dict(kw)
    data = kw.pop("_cal", cal_data)
    q = nncf.quantize(core.read_model(str(ir)), nncf.Dataset(data), subset_size=len(data), **kw)
    print(name, *metrics(q), flush=True)
