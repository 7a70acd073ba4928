"""``destseg benchmark``: train and test every (category, model, seed), resumable, and write
OUT/results.json and OUT/results.md beside the published numbers.

Each run lives in OUT/<category>-<model>-s<seed>/ and is trained and tested in a child process (so that
its peak memory is its own, and a crash in one run does not end the others). Re-running the command skips
finished runs and resumes interrupted ones. With several visible GPUs, runs are spread over them, one
process per GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from destseg import __version__
from destseg.checkpoint import atomic_write_text
from destseg.errors import DestsegError



def published() -> dict[str, dict]:
    """Each registered model's published reference numbers (MVTec AD means: not per category)."""
    from destseg.models import MODELS

    return {name: cls.published for name, cls in MODELS.items() if cls.published}
METRICS = ("i_auroc", "p_auroc", "p_ap", "pro", "iap", "iap90")
METRIC_LABELS = ("I-AUROC", "P-AUROC", "P-AP", "PRO", "IAP", "IAP@90")


@dataclass
class Job:
    category: str
    model: str
    seed: int
    dataset: str = ""
    root: str = ""

    @property
    def name(self) -> str:
        return f"{self.category}-{self.model}-s{self.seed}"


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    from destseg.device import describe_cpu

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {describe_cpu()}, {cores} cores"


def _run_child(cmd: list[str], log_path: Path, env: dict) -> tuple[int, float]:
    """Run ``cmd``, appending its output to ``log_path``; (exit code, peak RSS in MiB)."""
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def _finished(path: Path) -> bool:
    from destseg.checkpoint import load_checkpoint

    return path.is_file() and bool(load_checkpoint(path).get("finished"))


def config_differences(a: Path, b: Path) -> list[str]:
    """'field value-in-a vs value-in-b' for each model config field that differs between two runs."""
    from destseg.run import Run

    ca, cb = (Run(r).record["config"] for r in (a, b))
    return [f"{k} {ca.get(k)} vs {cb.get(k)}" for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]


def run_job(job: Job, args, out: Path, env: dict) -> dict:
    run = out / job.name
    bench_file = run / "bench.json"
    info = json.loads(bench_file.read_text()) if bench_file.is_file() else {}
    extra = args.train_args
    if run.exists() and info.get("train_args", []) != extra:
        raise DestsegError(f"{run} was trained with train options {info.get('train_args', [])} and this benchmark "
                           f"asks for {extra}: use another --out, or the same options")
    # the same schedule too (folders from before it was kept here: unchecked)
    if run.exists() and info.get("schedule", args.schedule) != args.schedule:
        raise DestsegError(f"{run} was trained with --schedule {info['schedule']} and this benchmark asks for "
                           f"{args.schedule}: use another --out, or the same schedule")
    py = [sys.executable, "-m", "destseg"]
    if not info.get("trained") and _finished(run / "checkpoint.pt"):  # trained, but not recorded here
        info["trained"] = True
    if not info.get("trained"):
        cmd = py + ["train", "--data", job.root, "--category", job.category, "--model", job.model, "--threshold-holdout", "0",
                    "--out", str(run), "--schedule", args.schedule, "--seed", str(job.seed), "--no-progress",
                    "--device", args.device]
        if (run / "checkpoint.pt").is_file():
            cmd = py + ["train", "--out", str(run), "--resume", "--no-progress"]
        else:
            cmd += ["--teacher", args.teacher] + (["--texture-dir", args.texture_dir] if args.texture_dir else [])
            cmd += ["--overwrite", *extra]  # the run directory is benchmark's: it holds bench.json already
            run.mkdir(parents=True, exist_ok=True)
            info.update(train_args=extra, schedule=args.schedule)
            atomic_write_text(bench_file, json.dumps(info, indent=2))
        code, peak = _run_child(cmd, out / f"{job.name}.log", env)
        if code != 0:
            raise DestsegError(f"{job.name}: training failed with exit code {code}; see {out / (job.name + '.log')}")
        info.update(trained=True, train_peak_mib=max(peak, info.get("train_peak_mib", 0)))
        atomic_write_text(bench_file, json.dumps(info, indent=2))
    # A schedule name that kept its meaning only in part (cpu before 2026-12-01 had the paper's widths) passes
    # the checks above: the seeds' rows share a mean only if their runs trained the same config.
    first = out / replace(job, seed=0).name
    if job.seed and (first / "config.json").is_file():
        differ = config_differences(first, run)
        if differ:
            raise DestsegError(f"{run} was trained with another config than {first.name} ({'; '.join(differ)}): "
                               "their rows cannot share a mean; use another --out")
    if not (run / "metrics.json").is_file() or not info.get("tested"):
        code, peak = _run_child(py + ["test", "--run", str(run), "--json", "--no-progress", "--device", args.device],
                                out / f"{job.name}.log", env)
        if code != 0:
            raise DestsegError(f"{job.name}: test failed with exit code {code}; see {out / (job.name + '.log')}")
        info.update(tested=True, test_peak_mib=peak)
        atomic_write_text(bench_file, json.dumps(info, indent=2))
    from destseg.checkpoint import load_checkpoint

    from destseg.run import training_summary

    metrics = json.loads((run / "metrics.json").read_text())
    ckpt = load_checkpoint(run / "checkpoint.pt")
    trained = training_summary(ckpt)
    return {"run": job.name, "dataset": job.dataset, "category": job.category, "model": job.model, "seed": job.seed,
            **{k: metrics[k] for k in METRICS}, "train_minutes": ckpt.get("elapsed_s", 0) / 60,
            "inference_images_per_s": metrics["images_per_s"], "train_peak_mib": info.get("train_peak_mib"),
            "train_peak_gpu_mib": ckpt.get("peak_gpu_mib"), "teacher": ckpt["teacher"],
            "steps_planned": trained["steps_planned"], "steps_trained": trained["steps_trained"],
            "undertrained": trained["undertrained"], "precision": metrics["precision"]}


def mean_sd(values: list[float]) -> str:
    """'mean ± sd' (sample sd) of ``values`` to one decimal, or the one value alone."""
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def results_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Benchmark results ({meta['schedule']} schedule)", "",
             f"destseg {meta['library_version']}, {meta['hardware']}, torch {meta['torch']}."
             + (f" Train options: `{' '.join(meta['train_args'])}`." if meta.get("train_args") else ""), "",
             "| run | teacher | steps trained / planned | precision | I-AUROC | P-AUROC | P-AP | PRO | IAP | IAP@90 | train min "
             "| infer img/s | peak RSS MiB | peak GPU MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def mib(v):
        return f"{v:.0f}" if v else "-"

    for r in rows:
        lines.append(f"| {r['run']} | {r['teacher']} | {_steps(r)} | {r.get('precision', '-')} | "
                     + " | ".join(f"{100 * r[k]:.1f}" for k in METRICS)
                     + f" | {r['train_minutes']:.1f} | {r['inference_images_per_s']:.1f} | "
                     + f"{mib(r['train_peak_mib'])} | {mib(r.get('train_peak_gpu_mib'))} |")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["category"], r["model"]), []).append(r)
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if multi:
        lines += ["", "Mean and standard deviation over seeds:", "",
                  "| category | model | seeds | " + " | ".join(METRIC_LABELS) + " |", "|---|---|---|" + "---|" * 6]
        for (cat, model), rs in multi.items():
            cells = [mean_sd([100 * r[k] for r in rs]) for k in METRICS]
            lines.append(f"| {cat} | {model} | {len(rs)} | " + " | ".join(cells) + " |")
    means = mean_over_categories(rows)
    if any(m["categories"] > 1 for m in means.values()):
        lines += ["", "Mean over categories (each category first averaged over its seeds):", "",
                  "| model | categories | " + " | ".join(METRIC_LABELS) + " | train min |", "|---|---|" + "---|" * 7]
        for model, m in means.items():
            lines.append(f"| {model} | {m['categories']} | " + " | ".join(f"{100 * m[k]:.1f}" for k in METRICS)
                         + f" | {m['train_minutes']:.1f} |")
    lines += ["", "Published (MVTec AD means over 15 categories, ResNet18 teacher, paper schedules):", "",
              "| model | source | I-AUROC | P-AUROC | P-AP | IAP |", "|---|---|---|---|---|---|"]
    reference = published()
    for model in sorted({r["model"] for r in rows}):
        p = reference.get(model)
        if p:
            vals = " | ".join(f"{100 * p[k]:.1f}" if k in p else "-" for k in ("i_auroc", "p_auroc", "p_ap", "iap"))
            lines.append(f"| {model} | {p['source']} | {vals} |")
    return "\n".join(lines) + "\n"


def _steps(row: dict) -> str:
    """'900 / 900', '420 / 900 (undertrained)', or the bare step count of a row from an earlier version."""
    if "steps_planned" not in row:
        return str(row.get("steps", "-"))
    trained = "?" if row["steps_trained"] is None else row["steps_trained"]
    return f"{trained} / {row['steps_planned']}" + (" (undertrained)" if row.get("undertrained") else "")


def parse_roots(specs: list[str]) -> dict[str, str]:
    """``--data`` values, each ``name=root`` or a bare root (named after its folder) -> {name: root}."""
    roots: dict[str, str] = {}
    for spec in specs:
        name, sep, root = spec.partition("=")
        if not sep:
            name, root = Path(spec).name or spec, spec
        if not Path(root).is_dir():
            raise DestsegError(f"--data {spec}: dataset root not found")
        if name in roots:
            raise DestsegError(f"--data {spec}: dataset name '{name}' given twice (use name=root)")
        roots[name] = root
    return roots


def locate_categories(roots: dict[str, str], spec: str) -> dict[str, tuple[str, str]]:
    """{category: (dataset name, root)}. ``spec``: 'all' (every category folder with a train/ folder in
    every root), or comma-separated names, each ``category`` or ``dataset:category``."""
    found: dict[str, list[str]] = {}
    for name, root in roots.items():
        for p in sorted(Path(root).iterdir()):
            if (p / "train").is_dir():
                found.setdefault(p.name, []).append(name)
    if spec == "all":
        wanted = [(None, c) for c in found]
    else:
        wanted = [tuple(c.strip().split(":", 1)) if ":" in c else (None, c.strip()) for c in spec.split(",") if c.strip()]
    places: dict[str, tuple[str, str]] = {}
    for dataset, cat in wanted:
        where = [d for d in found.get(cat, []) if dataset in (None, d)]
        if not where:
            raise DestsegError(f"--categories: '{cat}' not found in {', '.join(f'{n}={r}' for n, r in roots.items())}")
        if len(where) > 1:
            raise DestsegError(f"--categories: '{cat}' is in several datasets ({', '.join(where)}); "
                               f"write dataset:{cat}")
        places[cat] = (where[0], roots[where[0]])
    if not places:
        raise DestsegError("--categories: no category to run")
    return places


def mean_over_categories(rows: list[dict]) -> dict[str, dict]:
    """Per model: the mean over categories of each category's mean over seeds."""
    per: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        per.setdefault(r["model"], {}).setdefault(r["category"], []).append(r)
    out = {}
    for model, cats in per.items():
        cat_means = [{k: float(np.mean([r[k] for r in rs])) for k in METRICS + ("train_minutes",)} for rs in cats.values()]
        out[model] = {"categories": len(cats), **{k: float(np.mean([c[k] for c in cat_means]))
                                                  for k in METRICS + ("train_minutes",)}}
    return out


def _run_jobs(jobs: list[Job], args, out: Path, gpus: int, bar) -> list[dict]:
    """Every job's result row, in order; with several GPUs, one run per GPU at a time (each job takes a free
    GPU from a queue and gives it back)."""
    def env_for(slot: int | None) -> dict:
        env = dict(os.environ)
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        return env

    rows: list[dict] = []
    if gpus > 1:
        import queue
        from concurrent.futures import ThreadPoolExecutor

        free = queue.Queue()
        for gpu in range(gpus):
            free.put(gpu)

        def on_free_gpu(job):
            gpu = free.get()
            try:
                return run_job(job, args, out, env_for(gpu))
            finally:
                free.put(gpu)

        with ThreadPoolExecutor(gpus) as pool:
            for row in pool.map(on_free_gpu, jobs):
                rows.append(row)
                bar.update(1)
        return rows
    for job in jobs:
        bar.set_postfix_str(job.name)
        rows.append(run_job(job, args, out, env_for(None)))
        bar.update(1)
    return rows


def run_benchmark(args) -> int:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.train_args = list(getattr(args, "train_args", None) or [])  # checked by the CLI (cli.check_train_args)
    if args.seeds < 1:
        raise DestsegError(f"--seeds must be at least 1 (got {args.seeds})")
    roots = parse_roots(args.data)
    places = locate_categories(roots, args.categories)
    models = [m.strip() for m in args.models.split(",")]
    from destseg.models import MODELS
    from destseg.schedules import schedule_overrides

    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise DestsegError(f"unknown model(s) {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    for model in models:  # fail now, not in the first child
        schedule_overrides(args.schedule if args.schedule != "auto" else "paper", model, 1)
    jobs = [Job(c, m, s, ds, root) for c, (ds, root) in places.items() for m in models for s in range(args.seeds)]
    gpus = torch.cuda.device_count() if args.device in ("auto", "cuda") else 0
    t0 = time.time()
    bar = tqdm(total=len(jobs), desc="benchmark", unit="run", dynamic_ncols=True, disable=args.no_progress)
    rows = _run_jobs(jobs, args, out, gpus, bar)
    bar.close()
    meta = {"library_version": __version__, "hardware": hardware(), "torch": torch.__version__,
            "schedule": args.schedule, "train_args": args.train_args, "data": roots,
            "elapsed_minutes": (time.time() - t0) / 60}
    atomic_write_text(out / "results.json", json.dumps({"meta": meta, "runs": rows,
                                                        "mean_over_categories": mean_over_categories(rows),
                                                        "published": published()}, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_markdown(rows, meta))
    print(results_markdown(rows, meta))
    return 0
