"""destseg: industrial visual anomaly detection with student-teacher networks."""

__version__ = "0.6.1"

from destseg.errors import DestsegError  # noqa: E402

__all__ = ["__version__", "DestsegError", "load_detector", "test_on_folders", "train_on_folder"]


def load_detector(run_dir, device="cpu", precision="auto", backend="auto", compile="auto"):
    """Load a trained run for prediction (``backend``: auto, torch or openvino; ``compile``: auto, on, off).
    See :class:`destseg.infer.Detector`."""
    from destseg.infer import Detector

    return Detector.load(run_dir, device=device, precision=precision, backend=backend, compile=compile)


def train_on_folder(good_dir, out, model="destseg", overwrite=False, **settings):
    """Train a detector on every image under ``good_dir`` (a plain folder of good images) into the run folder
    ``out``, as ``destseg train --data GOOD_DIR --out OUT`` does; returns the checkpoint path. ``settings``:
    training options (:class:`destseg.train.TrainOptions` fields: ``texture_dir``, ``seed``, ``schedule``,
    ``time_budget_s``...) and model config fields (``steps``, ``seg_width``...), which override the schedule."""
    import dataclasses

    from destseg.data import DataSource
    from destseg.train import TrainOptions, train

    option_names = {f.name for f in dataclasses.fields(TrainOptions)}
    options = TrainOptions(**{k: v for k, v in settings.items() if k in option_names})
    overrides = {k: v for k, v in settings.items() if k not in option_names}
    return train(out, model, data=DataSource.folder(good_dir), options=options, overrides=overrides,
                 overwrite=overwrite)


def test_on_folders(run_dir, good=None, defect=None, masks=None, **kwargs):
    """Measure a run on labelled folders, as ``destseg test --good DIR --defect DIR [--masks DIR]`` does: a
    dict of metrics (image metrics always; pixel metrics on the defect images with a mask), the decisions at
    the thresholds in force, and the thresholds this split suggests (recorded, not put in force unless
    ``adopt_thresholds=True``). ``kwargs``: see :func:`destseg.infer.evaluate_run`."""
    from destseg.data import TestFolders
    from destseg.infer import evaluate_run

    data = TestFolders(*(None if d is None else str(d) for d in (good, defect, masks)))
    result = evaluate_run(run_dir, data, **{"progress": False, **kwargs})
    result.pop("_outputs", None)
    return result
