"""Camera frames for the loop: keep the latest one, take it at speech onset, fit it to the model's input."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from omni import fit_image

from .ports import Camera, Clock

FRAME_INTERVAL_S = 1.0  # how often the latest camera frame is refreshed
POLL_S = 0.05  # how often the background thread checks whether a frame is due


@dataclass(frozen=True)
class Snapshot:
    image: np.ndarray  # (H, W, 3) uint8 RGB as the camera gave it
    time: float  # clock time it was grabbed (s)
    index: int  # 0 for the first frame grabbed, then 1, 2, ...


def fit_frame(image: np.ndarray) -> np.ndarray:
    """The model's input square: (224, 224, 3) uint8, resized and cropped the way the official CLIP path does.

    The engine applies the same transform to what it is given, which leaves this square unchanged: the
    loop hands over 150 kB instead of a full camera frame, with the pixels the model would have seen.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"a camera frame must be an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
    return np.asarray(fit_image(Image.fromarray(np.ascontiguousarray(image))))


class CameraFeed:
    """Keeps the latest frame, refreshed every `interval_s` of clock time by `tick()`."""

    def __init__(self, camera: Camera, interval_s: float = FRAME_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError(f"camera interval must be > 0 s, got {interval_s}")
        self.camera = camera
        self.interval_s = interval_s
        self._latest: Snapshot | None = None
        self._grabbed = 0
        self._due = float("-inf")
        self._lock = threading.Lock()

    def tick(self, now: float) -> None:
        """Grab a frame if one is due."""
        if now < self._due:
            return
        self._due = now + self.interval_s
        image = self.camera.read()
        if image is None:
            return
        with self._lock:
            self._latest = Snapshot(image, now, self._grabbed)
            self._grabbed += 1

    def latest(self) -> Snapshot | None:
        with self._lock:
            return self._latest

    def start(self, clock: Clock, stop: threading.Event) -> threading.Thread:
        """Tick from a background thread until `stop` is set (for real cameras, whose reads block)."""
        def run() -> None:
            while not stop.wait(POLL_S):
                self.tick(clock.now())
        thread = threading.Thread(target=run, name="camera", daemon=True)
        thread.start()
        return thread
