"""destseg: industrial visual anomaly detection with student-teacher networks."""

__version__ = "0.2.0"

from destseg.errors import DestsegError  # noqa: E402

__all__ = ["__version__", "DestsegError", "load_detector"]


def load_detector(run_dir, device="cpu", precision="auto", backend="auto", compile="auto"):
    """Load a trained run for prediction (``backend``: auto, torch or openvino; ``compile``: auto, on, off).
    See :class:`destseg.infer.Detector`."""
    from destseg.infer import Detector

    return Detector.load(run_dir, device=device, precision=precision, backend=backend, compile=compile)
