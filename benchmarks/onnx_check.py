"""Export a run to ONNX and compare onnxruntime with PyTorch on the run's test images: max map and score
difference, and CPU throughput of both.

    .venv/bin/python benchmarks/onnx_check.py --run runs/bench/bottle-destseg-s0 [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from destseg.data.datasets import TestDataset
from destseg.export import export_onnx
from destseg.models.backbones import backbone_spec
from destseg.device import autocast
from destseg.run import Run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    run = Run(args.run)
    model, ckpt = run.load_model("cpu")
    model = model.to(memory_format=torch.channels_last)
    ds = TestDataset(run.data.scan().test, run.config.image_size, backbone_spec(run.config.teacher).normalize)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    batches = list(torch.split(images, args.batch_size))

    onnx_path = Path(tempfile.mkdtemp()) / "model.onnx"
    export_onnx(args.run, onnx_path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def run_torch(dtype):
        out_maps, out_scores = [], []
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                with autocast(torch.device("cpu"), dtype):
                    o = model(b.contiguous(memory_format=torch.channels_last))
                out_maps.append(o["map"].float().numpy())
                out_scores.append(o["score"].float().numpy())
        return np.concatenate(out_maps), np.concatenate(out_scores), len(images) / (time.perf_counter() - t0)

    run_torch(None)  # warm-up
    maps32, scores32, ips32 = run_torch(None)
    _, _, ips16 = run_torch(torch.bfloat16)
    session.run(None, {"images": batches[0].contiguous().numpy()})  # warm-up
    t0 = time.perf_counter()
    outs = [session.run(None, {"images": b.contiguous().numpy()}) for b in batches]
    ips_ort = len(images) / (time.perf_counter() - t0)
    maps_ort = np.concatenate([o[0] for o in outs])
    scores_ort = np.concatenate([o[1] for o in outs])
    print(json.dumps({
        "images": len(images), "onnx_mb": round(onnx_path.stat().st_size / 2**20, 1),
        "max_abs_map_diff": float(np.abs(maps_ort - maps32).max()),
        "max_abs_score_diff": float(np.abs(scores_ort - scores32).max()),
        "images_per_s": {"onnxruntime_fp32": ips_ort, "pytorch_fp32": ips32, "pytorch_bf16_autocast": ips16},
        "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
