"""destseg: industrial visual anomaly detection with student-teacher networks."""

__version__ = "0.1.0"

from destseg.errors import DestsegError  # noqa: E402

__all__ = ["__version__", "DestsegError", "load_detector"]


def load_detector(run_dir, device="cpu", precision="auto"):
    """Load a trained run for prediction. See :class:`destseg.infer.Detector`."""
    from destseg.infer import Detector

    return Detector.load(run_dir, device=device, precision=precision)
