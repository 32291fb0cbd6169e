"""Real devices behind the loop's interfaces: microphone and speaker through sounddevice (PortAudio),
camera through OpenCV. Both libraries are imported only here, when a device is opened."""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack, closing
from typing import Any, TextIO

import numpy as np

from omni import OUTPUT_SAMPLE_RATE

from .camera import FRAME_INTERVAL_S, CameraFeed
from .loop import LoopConfig, VoiceLoop
from .signal import FRAME_SAMPLES, MIC_RATE, pcm_to_float

SOUNDDEVICE_HINT = "pip install sounddevice==0.5.6 and the PortAudio library (apt-get install libportaudio2)"
OPENCV_HINT = "pip install opencv-python-headless==5.0.0.93"
OUTPUT_BLOCK_S = 0.02  # speaker callback block: what a flush cannot recall
LATENCY = "low"  # PortAudio's suggested latency for both streams
CAMERA_PROBE = 4  # camera indices that --list-devices tries


class DeviceError(RuntimeError):
    """A device library is missing, or a device cannot be opened."""


def _sounddevice() -> Any:
    try:
        import sounddevice
    except (ImportError, OSError) as e:  # OSError: the module is there but libportaudio is not
        raise DeviceError(f"microphone and speaker need sounddevice: {SOUNDDEVICE_HINT} ({e})") from e
    return sounddevice


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:
        raise DeviceError(f"the camera needs OpenCV: {OPENCV_HINT}") from e
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # no warning per index that has no camera
    return cv2


def _open(kind: str, make: Any, device: int | None) -> Any:
    sd = _sounddevice()
    try:
        stream = make(sd)
    except (sd.PortAudioError, ValueError) as e:
        raise DeviceError(f"could not open the {kind} (device {device}): {e}; "
                           f"see --list-devices for the device numbers") from e
    stream.start()
    return stream


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


class Microphone:
    """16 kHz mono frames from an input device; `read()` blocks for one frame (32 ms)."""

    def __init__(self, device: int | None = None) -> None:
        self.stream = _open("microphone", lambda sd: sd.InputStream(
            samplerate=MIC_RATE, channels=1, dtype="float32", blocksize=FRAME_SAMPLES, device=device,
            latency=LATENCY), device)

    def read(self) -> np.ndarray:
        data, _overflowed = self.stream.read(FRAME_SAMPLES)
        return np.ascontiguousarray(data[:, 0])

    def close(self) -> None:
        self.stream.close()


class Speaker:
    """Plays queued PCM from PortAudio's callback; `flush()` silences it at once (queue and device buffers)."""

    def __init__(self, sample_rate: int, device: int | None = None) -> None:
        self.sample_rate = sample_rate
        self.block = round(OUTPUT_BLOCK_S * sample_rate)
        self._queue: deque[np.ndarray] = deque()
        self._queued = 0
        self._played: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.stream = _open("speaker", lambda sd: sd.OutputStream(
            samplerate=sample_rate, channels=1, dtype="float32", blocksize=self.block, device=device,
            latency=LATENCY, callback=self._callback), device)

    def write(self, pcm: bytes, turn: int) -> None:
        samples = pcm_to_float(pcm)
        with self._lock:
            self._queue.append(samples)
            self._queued += len(samples)

    def flush(self) -> float:
        """Drop our queue, then abort the stream: that discards what PortAudio and the host already hold."""
        with self._lock:
            self._queue.clear()
            self._queued = 0
        self.stream.abort()
        self.stream.start()
        return self.block / self.sample_rate  # at most the block the device was playing

    def buffered(self) -> float:
        with self._lock:
            return self._queued / self.sample_rate

    def take_played(self) -> np.ndarray:
        with self._lock:
            played, self._played = self._played, []
        return np.concatenate(played) if played else np.zeros(0, np.float32)

    def close(self) -> None:
        self.stream.close()

    def _callback(self, outdata: np.ndarray, frames: int, _time: Any, _status: Any) -> None:
        out = np.zeros(frames, np.float32)
        with self._lock:
            filled = 0
            while self._queue and filled < frames:
                head = self._queue[0]
                take = head[:frames - filled]
                out[filled:filled + len(take)] = take
                filled += len(take)
                if len(take) == len(head):
                    self._queue.popleft()
                else:
                    self._queue[0] = head[len(take):]
            self._queued -= filled
            self._played.append(out)
        outdata[:, 0] = out


class OpenCvCamera:
    """RGB frames from an OpenCV capture device."""

    def __init__(self, index: int) -> None:
        self._cv2 = _cv2()
        self.capture = self._cv2.VideoCapture(index)
        if not self.capture.isOpened():
            raise DeviceError(f"camera {index} could not be opened; see --list-devices, or run with --no-camera")

    def read(self) -> np.ndarray | None:
        ok, bgr = self.capture.read()
        return self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB) if ok else None

    def close(self) -> None:
        self.capture.release()


def list_devices() -> str:
    """The audio devices PortAudio sees and the camera indices OpenCV can open."""
    lines = ["audio devices (use the number with --input-device / --output-device):"]
    devices = _sounddevice().query_devices()
    lines.append(str(devices) if len(devices) else "  none")
    cv2 = _cv2()
    cameras = []
    for index in range(CAMERA_PROBE):
        capture = cv2.VideoCapture(index)
        if capture.isOpened():
            cameras.append(f"  {index}")
        capture.release()
    lines.append(f"cameras (use the number with --camera), indices 0-{CAMERA_PROBE - 1} tried:")
    lines.extend(cameras or ["  none"])
    return "\n".join(lines)


def open_camera(index: int | None, engine: Any, interval_s: float, out: TextIO) -> CameraFeed | None:
    """The feed of camera `index` when the engine can see and the camera opens; otherwise one notice and None.

    A camera is optional: a Mini-Omni (v1) checkpoint cannot use one, and a missing one must not stop the talk.
    """
    if index is None:
        return None
    if not engine.can_see:
        out.write(f"note: this {engine.family} checkpoint cannot see, so camera {index} is not used\n")
        return None
    try:
        return CameraFeed(OpenCvCamera(index), interval_s)
    except DeviceError as e:
        out.write(f"note: {e}; questions go without an image\n")
        return None


def run_live(load_engine: Callable[[], Any], config: LoopConfig, out: TextIO, input_device: int | None = None,
             output_device: int | None = None, camera: int | None = None,
             camera_interval_s: float = FRAME_INTERVAL_S) -> None:
    """Talk to the engine through the microphone, speaker and camera until Ctrl-C.

    Microphone and speaker open first, so a missing one fails before the engine loads; `load_engine` returns a
    warm engine. The camera opens after it, and only if the model can see.
    """
    clock, stop = MonotonicClock(), threading.Event()
    with ExitStack() as devices:
        speaker = devices.enter_context(closing(Speaker(OUTPUT_SAMPLE_RATE, output_device)))
        mic = devices.enter_context(closing(Microphone(input_device)))
        engine = load_engine()
        feed = open_camera(camera, engine, camera_interval_s, out)
        if feed is not None:
            devices.enter_context(closing(feed.camera))
        loop = devices.enter_context(closing(VoiceLoop(engine, speaker, clock, config, camera=feed, out=out)))
        devices.callback(stop.set)
        if feed is not None:
            feed.start(clock, stop)
        out.write("listening (Ctrl-C to stop)\n")
        try:
            loop.run(mic)
        except KeyboardInterrupt:
            out.write("\nstopped\n")
