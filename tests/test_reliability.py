"""Hostile input and hard kills: the image loader under fuzzing, kill -9 during a checkpoint save."""

import io
import signal
import subprocess
import sys
import time

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from destseg.checkpoint import load_checkpoint
from destseg.data.images import read_mask, read_rgb
from destseg.errors import ImageError


def _valid_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _valid_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


SEEDS = [_valid_png(), _valid_jpeg()]


def _load(tmp_path, data: bytes, name: str):
    path = tmp_path / name
    path.write_bytes(data)
    for reader in (read_rgb, read_mask):
        try:
            reader(path)
        except ImageError as exc:
            assert str(path) in str(exc)  # the project's own error, naming the file


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_random_bytes_give_only_clear_errors(tmp_path, data):
    _load(tmp_path, data, "random.png")


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(range(len(SEEDS))), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                               min_size=1, max_size=8),
       cut=st.integers(0, 10**6))
def test_mutated_images_give_only_clear_errors(tmp_path, seed, flips, cut):
    data = bytearray(SEEDS[seed])
    for pos, value in flips:
        data[pos % len(data)] = value
    data = bytes(data[: max(1, cut % (len(data) + 1))])
    _load(tmp_path, data, "mutated.png" if seed == 0 else "mutated.jpg")


SAVER = """
import sys, torch
from destseg.checkpoint import save_checkpoint
i = 0
while True:
    i += 1
    save_checkpoint(sys.argv[1], {"model": "destseg", "config": {}, "step": i,
                                  "model_state": {"w": torch.full((4_000_000,), float(i))}})
    print(i, flush=True)
"""


def test_kill_9_during_save_never_leaves_a_broken_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    rng = np.random.default_rng(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline()  # at least one complete save
        time.sleep(float(rng.uniform(0, 0.3)))  # then kill it at a random point, most likely mid-save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = load_checkpoint(path)
        assert float(ckpt["model_state"]["w"][0]) == ckpt["step"]  # complete and self-consistent
