"""Devices and precision: which device (and what hardware it is), which autocast dtype, memory layout and
host-to-device copies."""

from __future__ import annotations

import contextlib
import os

import torch

from destseg.errors import DestsegError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DestsegError(f"--device '{name}' is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise DestsegError(f"--device '{name}': only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DestsegError(f"--device '{name}' requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DestsegError(f"--device '{name}': only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """None means fp32. bf16 on CPU uses AMX/AVX-512 through oneDNN where the CPU has it. ``fp32`` on CUDA
    allows TF32 (tensor cores for matmuls and convolutions; stated in README)."""
    if precision == "fp32":
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return None
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_bf16_native()
    if precision == "bf16" and not supported:
        raise DestsegError(f"bf16 is not supported on {device}; use --precision fp32")
    if precision not in ("auto", "bf16"):
        raise DestsegError(f"unknown precision '{precision}' (auto, bf16 or fp32)")
    return torch.bfloat16 if supported else None


def cpu_bf16_native() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AMX or AVX-512 bf16, within ``ONEDNN_MAX_CPU_ISA``)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def describe_cpu(cpuinfo: str | None = None) -> str:
    """The CPU's model name, family and model numbers and its fastest bf16/vector path, e.g. 'AMD EPYC
    (family 25 model 17, AVX-512 bf16, no AMX)', from /proc/cpuinfo (or the given text): benchmark figures from
    two machines are not comparable without it."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            import platform

            return platform.processor() or platform.machine() or "unknown CPU"
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor's entry
            fields[key.strip()] = value.strip()
    name = " ".join(fields.get("model name", "").split()) or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    if "amx_bf16" in flags:
        vector = "AMX bf16"
    elif "avx512_bf16" in flags:
        vector = "AVX-512 bf16, no AMX"
    elif "avx512f" in flags:
        vector = "AVX-512, no bf16"
    elif "avx2" in flags:
        vector = "AVX2, no AVX-512"
    else:
        vector = ""
    # A cloud VM often hides the model name ("Intel(R) Xeon(R) Processor"): the family and model numbers
    # still tell one generation from another (Intel family 6: model 143 Sapphire Rapids, 207 Emerald Rapids).
    ident = ""
    if "cpu family" in fields and "model" in fields:
        ident = f"family {fields['cpu family']} model {fields['model']}"
    details = ", ".join(d for d in (ident, vector) if d)
    return f"{name} ({details})" if details else name


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and bf16 path (``describe_cpu``)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu()


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def prepare_model(model: torch.nn.Module, device: torch.device, dtype) -> torch.nn.Module:
    model = model.to(device)
    if dtype is not None or device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)  # oneDNN/cuDNN fast paths
    return model


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.ndim == 4 and v.shape[1] == 3:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def default_workers(device: torch.device) -> int:
    cpus = os.cpu_count() or 1
    if device.type == "cpu":
        return 0 if cpus <= 2 else min(4, cpus // 4)  # on a small CPU a worker steals compute threads
    return min(8, cpus)


def io_workers(device: torch.device) -> int:
    """Workers that read and decode images for ``test`` and ``predict``: at least 2, since decoding and PNG
    writing overlap the model even on a 2-core CPU (+10-35% measured, docs/BENCHMARKS.md)."""
    return max(2, default_workers(device))


class CompiledModel:
    """``torch.compile`` (inductor) around an inference model, falling back to eager with one warning line
    when compilation fails (no compiler, an unsupported operation...). The first call compiles."""

    def __init__(self, model):
        self.eager, self.failed = model, False
        self.compiled = torch.compile(model)

    def __getattr__(self, name):
        return getattr(self.eager, name)

    def __call__(self, x):
        if not self.failed:
            try:
                return self.compiled(x)
            except Exception as exc:  # any compiler failure: keep serving, eagerly
                import sys

                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                print(f"destseg: warning: torch.compile failed ({type(exc).__name__}: {first}); running eagerly",
                      file=sys.stderr)
                self.failed = True
        return self.eager(x)


def should_compile(choice: str, device: torch.device) -> bool:
    """``auto`` compiles on CUDA, where it pays (docs/BENCHMARKS.md); on a CPU the compile time (minutes on
    2 cores) outweighs the gain for a test split, so ``on`` is needed there."""
    if choice not in ("auto", "on", "off"):
        raise DestsegError(f"--compile must be auto, on or off (got {choice!r})")
    return choice == "on" or (choice == "auto" and device.type == "cuda")
