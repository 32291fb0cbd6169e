"""`OmniEngine`: load a checkpoint once, then answer questions as a stream of audio/text chunks."""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from .audio import (
    N_SAMPLES, OUTPUT_SAMPLE_RATE, SAMPLE_RATE, AudioSource, feature_frames, load_audio, log_mel, pad_or_trim,
    trimmed_length,
)
from .auto import FORCED_REASON, resolve_auto
from .batch import Job, Scheduler, Setup
from .checkpoint import TOKENIZER_FILE, clip_path, ensure_checkpoint, load_lm, snac_dir, whisper_path
from .clip import VisionTower, load_vision_tower
from .codec import AnswerAudio, Frame, SnacCodec
from .config import CONFIG_FILE, ModelConfig
from .device import resolve_device, resolve_dtype
from .errors import CheckpointError
from .generate import Sequence, SpeechDecoder, Step, TextDecoder, check_length, to_streams
from .image import ImageSource, load_image
from .runtime import (
    AUTO_MODE, DEFAULT_MODE, Runtime, load_whisper, prepare_lm, release_freed_memory, resolve_mode, trim_heap,
)
from .sampling import GenerationConfig
from .tokens import IMAGE_PROMPT_EXTRA, PROMPT_EXTRA, Task, TextStream, build_image_prompt, build_prompt
from .tuning import Overrides
from .results import OmniChunk, OmniResult, Timings
from .units import drain

WARMUP_SECONDS = 1.0
WARMUP_TONE_HZ = 220.0
WARMUP_LEVEL = 0.3
WARMUP_STEPS = 12  # enough decode steps for one audio chunk
# Requests decoding together (`max_batch`), by device: on a 2-core CPU (AMD EPYC, 2026-12-02) a fast step of
# 2 requests cost 1.25x one, of 4 requests 1.47x, exact 1.62x and 1.88x, while each answer must keep real
# time (bench.py --concurrency, docs/performance.md "Many at once"); a GPU has room for dozens (not measured).
DEFAULT_MAX_BATCH = {"cpu": 2, "cuda": 32}
TEXT_IDS_KEPT = 8  # text questions whose token ids are kept (see OmniEngine.text_ids)

Cancel = threading.Event | Callable[[], bool] | None


@dataclass(frozen=True)
class Prepared:
    """A request turned into model inputs, and the policy that decodes its answer."""

    prompt: torch.Tensor  # (B, 8, T) global ids
    decoder: SpeechDecoder | TextDecoder
    audio_features: torch.Tensor | None = None  # (B, L, whisper_dim)
    image_features: torch.Tensor | None = None  # (B, 50, vision_dim)


class OmniEngine:
    """A loaded Mini-Omni model that answers audio or text questions with speech and/or text.

    Device and dtype are decided here, once. Requests from any number of threads are answered
    together: up to `max_batch` decode in one batch (`omni.batch`), the rest wait in arrival order.
    Each request has its own cache, position and random generators, so its answer equals the one it
    gets alone on a fresh engine.
    """

    def __init__(self, ckpt_dir: str | Path = "checkpoint", device: str | torch.device = "auto",
                 dtype: str | torch.dtype | None = None, family: str = "mini-omni", mode: str = DEFAULT_MODE,
                 trim_encoder: bool = False, max_batch: int | None = None, overrides: Overrides | None = None) -> None:
        """`overrides`: speed choices forced instead of measured (default: the environment's).
        `mode="auto"`: exact where this machine keeps up with it, else fast (`omni.auto`); `mode_reason` says why."""
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        overrides = overrides if overrides is not None else Overrides.from_env()
        runtime = None if mode == AUTO_MODE else resolve_mode(mode, self._device, overrides)  # checked before loading
        if runtime is not None and runtime.int8 and self._dtype != torch.float32:
            raise ValueError(f"mode='fast' quantizes the fp32 weights to int8; leave dtype unset (got {self._dtype})")
        # Whisper on the question's own length instead of 30 s: much cheaper, but other features.
        self.trim_encoder = trim_encoder
        self.ckpt_dir = ensure_checkpoint(ckpt_dir, family)
        self.config = ModelConfig.from_checkpoint(self.ckpt_dir)
        self._max_batch = max_batch or DEFAULT_MAX_BATCH.get(self._device.type, DEFAULT_MAX_BATCH["cpu"])
        self.last_timings: Timings | None = None  # where the latest request's time went
        self.runtime: Runtime | None = None
        self.mode_reason = FORCED_REASON
        if runtime is None:
            choice = resolve_auto(self._device, self._dtype, self.config, overrides,
                                  lambda: self._load(resolve_mode("exact", self._device, overrides)))
            runtime, self.mode_reason = resolve_mode(choice.mode, self._device, overrides), choice.reason
        if runtime != self.runtime:  # not loaded yet, or measured in exact mode and fast chosen
            self._load(runtime)

    def _load(self, runtime: Runtime) -> OmniEngine:
        """Load the models as `runtime` computes; a second call (auto mode's measurement) replaces the first."""
        self.runtime = runtime
        self.model = self.whisper = self.codec = self.vision = None  # a reload frees the old parts first
        self.model = load_lm(self.ckpt_dir, self.config, self._device, self._dtype)
        prepare_lm(self.model, self.runtime)  # int8: before the other models load, so the fp32 pages go first
        self.tokenizer = Tokenizer.from_file(str(self.ckpt_dir / TOKENIZER_FILE))
        # The server counts a text question's tokens before admitting it, then asks the same question: the
        # latest few tokenizations are kept so a text is tokenized once (a long one takes a while).
        self._text_ids = lru_cache(maxsize=TEXT_IDS_KEPT)(lambda text: tuple(self.tokenizer.encode(text).ids))
        self.whisper = load_whisper(whisper_path(self.ckpt_dir), self._device, self.runtime)
        if self.whisper.n_state != self.config.whisper_adapter_dim:
            raise CheckpointError(f"Whisper width {self.whisper.n_state} != whisper_adapter_dim "
                                  f"{self.config.whisper_adapter_dim} in {CONFIG_FILE}")
        self.codec = SnacCodec.from_dir(snac_dir(self.ckpt_dir), self._device)
        self.vision = self._load_vision() if self.config.vision_adapter_dim else None
        release_freed_memory()
        # Whenever no request is left, the pages the last ones freed (encoder activations, mostly) go back
        # to the OS: ~10 ms on the thread that ran the last turn; the next request refills them unmeasurably fast.
        self.scheduler = Scheduler(self.model, self._max_batch, on_idle=trim_heap)
        return self

    def _load_vision(self) -> VisionTower:
        tower = load_vision_tower(clip_path(self.ckpt_dir), self._device)
        if tower.output_dim != self.config.vision_adapter_dim:
            raise CheckpointError(f"CLIP output width {tower.output_dim} != vision_adapter_dim "
                                  f"{self.config.vision_adapter_dim} in {CONFIG_FILE}")
        return tower

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def mode(self) -> str:
        """The mode computing: with `mode="auto"`, the one it resolved to (`mode_reason`: why)."""
        return self.runtime.name

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def can_see(self) -> bool:
        """Whether image questions are answered: Mini-Omni2 checkpoints only."""
        return self.vision is not None

    @property
    def sample_rate(self) -> int:
        return OUTPUT_SAMPLE_RATE

    def text_ids(self, text: str) -> list[int]:
        """The token ids of a text question (kept for the latest TEXT_IDS_KEPT texts)."""
        return list(self._text_ids(text))

    def stream(self, audio: AudioSource | None = None, *, text: str | None = None, task: str | Task = Task.A1A2,
               image: ImageSource | None = None, sample_rate: int | None = None, cancel: Cancel = None,
               config: GenerationConfig | None = None, **options: Any) -> Iterator[OmniChunk]:
        """Answer one question as it is generated.

        Args:
            audio: a file path, the bytes of an audio file, or a numpy array (then `sample_rate`).
            text: the question for the text-input tasks T1A2 and T1T2.
            task: A1A2 (default), A1T2, ASR, T1A2 or T1T2.
            image: for a Mini-Omni2 checkpoint and task A1A2, a picture the spoken question is about:
                a path, the bytes of an image file, a PIL image or an `(H, W, 3)` uint8 array.
            cancel: an Event or callable, checked before every decode step; set, it ends the stream. One
                with an `is_set()` (an Event) is also read between every two units of work, during the
                encoder and prefill too: the stream then ends within one unit (about one decode step).
            config / options: a `GenerationConfig`, or its fields as keywords (stream_stride, first_stride,
                max_tokens, temperature, top_k, top_p, seed, joins).
        Returns:
            an iterator of `OmniChunk`: the first audio chunk once its frames and the decoder's look-ahead
            are decoded (12 decode steps at stride 4; joins="official": 10, the official number), then
            one every `stream_stride` steps, then the rest.
        """
        if config is not None and options:
            raise TypeError(f"pass a GenerationConfig or its fields as keywords, not both ({sorted(options)})")
        cfg = config if config is not None else GenerationConfig(**options)
        task = self._check_task(task, audio, text)
        timings = Timings()
        with self._timed(timings, "image_load"):
            pixels = self._check_image(image, task)
        with self._timed(timings, "audio_decode"):
            samples = load_audio(audio, sample_rate) if task.audio_in else None
        text_ids = self.text_ids(text) if not task.audio_in else None
        if text_ids is not None and not text_ids:
            raise ValueError("the text question is empty")
        check_length(prompt_length(task, samples, text_ids, pixels is not None), cfg, self.config.block_size)
        return self._answer(task, samples, text_ids, pixels, cfg, _as_callable(cancel), timings, _watcher(cancel))

    def run(self, audio: AudioSource | None = None, **kwargs: Any) -> OmniResult:
        """The whole answer: `stream()` collected."""
        chunks = list(self.stream(audio, **kwargs))
        streams = to_streams([step for chunk in chunks for step in chunk.steps])
        return OmniResult(b"".join(c.pcm for c in chunks), "".join(c.text for c in chunks), streams)

    def generate(self, audio: AudioSource | None = None, return_numpy: bool = False, **kwargs: Any) -> bytes | np.ndarray:
        """The spoken answer as int16 LE PCM bytes, or float32 samples in [-1, 1] with `return_numpy`."""
        result = self.run(audio, **kwargs)
        return result.wave if return_numpy else result.pcm

    def warmup(self) -> None:
        """One short answer to a synthetic tone, so the first real request pays no first-call costs."""
        for _ in self.stream(**self.warmup_question()):
            pass

    @staticmethod
    def warmup_question() -> dict[str, Any]:
        """`stream()`'s arguments for the warm-up answer: a tone, answered for WARMUP_STEPS decode steps."""
        t = np.arange(int(WARMUP_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
        tone = (WARMUP_LEVEL * np.sin(2 * np.pi * WARMUP_TONE_HZ * t)).astype(np.float32)
        max_tokens = prompt_length(Task.A1A2, tone, None) + WARMUP_STEPS
        return {"audio": tone, "sample_rate": SAMPLE_RATE, "max_tokens": max_tokens}

    @contextmanager
    def _timed(self, timings: Timings, name: str) -> Iterator[None]:
        """Add the block's time to `timings.<name>` (append, for a list), once the device has finished it."""
        start = time.perf_counter()
        yield
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        elapsed = time.perf_counter() - start
        value = getattr(timings, name)
        if isinstance(value, list):
            value.append(elapsed)
        else:
            setattr(timings, name, value + elapsed)

    def _decode_audio(self, audio: AnswerAudio, frame: Frame | None, timings: Timings) -> bytes:
        """The answer's audio after one more decode step's tokens (`frame`), or its tail (None); the time of
        each call that decoded a chunk goes to `timings.snac`."""
        start = time.perf_counter()
        pcm = audio.push(frame) if frame is not None else audio.flush()
        if pcm:  # bytes on the host: the device has finished
            timings.snac.append(time.perf_counter() - start)
        return pcm

    @staticmethod
    def _check_task(task: str | Task, audio: AudioSource | None, text: str | None) -> Task:
        try:
            task = Task(task.upper() if isinstance(task, str) else task)
        except ValueError as e:
            raise ValueError(f"unknown task {task!r}; choose one of {[t.value for t in Task]}") from e
        if task.audio_in and (audio is None or text is not None):
            raise ValueError(f"task {task.value} answers an audio question: pass audio and no text")
        if not task.audio_in and (text is None or audio is not None):
            raise ValueError(f"task {task.value} answers a text question: pass text= and no audio")
        return task

    def _check_image(self, image: ImageSource | None, task: Task) -> torch.Tensor | None:
        """The image's `(3, 224, 224)` CLIP input, or a clear error where an image cannot be used."""
        if image is None:
            return None
        if not self.can_see:
            raise ValueError(f"this {self.family} checkpoint cannot see: image questions need a Mini-Omni2 "
                             f"checkpoint (gpt-omni/mini-omni2, with its CLIP tower)")
        if task != Task.A1A2:
            raise ValueError(f"an image goes with task A1A2 (the official image path: spoken question, spoken "
                             f"answer); task {task.value} takes none")
        return load_image(image)

    def prepare(self, task: Task, samples: np.ndarray | None, text_ids: list[int] | None,
                pixels: torch.Tensor | None = None, timings: Timings | None = None) -> Prepared:
        """The prompt, injected features and decoding policy of a request (`pixels`: a preprocessed image)."""
        return drain(self._prepare_units(task, samples, text_ids, pixels, timings or Timings()))

    @torch.inference_mode()
    def _prepare_units(self, task: Task, samples: np.ndarray | None, text_ids: list[int] | None,
                       pixels: torch.Tensor | None, timings: Timings) -> Generator[None, None, Prepared]:
        """`prepare` in units of work (the Whisper encoder a block at a time), for the scheduler."""
        if samples is None:
            prompt = build_prompt(task, text_ids=text_ids).unsqueeze(0).to(self._device)
            return Prepared(prompt, self._decoder(task, 1))
        n_frames = feature_frames(samples.size)
        length = trimmed_length(samples.size) if self.trim_encoder else N_SAMPLES
        with self._timed(timings, "mel"):
            mel = log_mel(pad_or_trim(samples, length), self._device)
        yield
        rows = (Task.A1A2, Task.A1T2) if task == Task.A1A2 else (task,)
        image_features = None
        features = (yield from self._timed_units(self.whisper.stages(mel.unsqueeze(0)), timings, "encoder"))
        features = features[:, :n_frames]  # (1, L, 768)
        if pixels is not None:
            yield
            with self._timed(timings, "clip"):
                image_features = self.vision(pixels.unsqueeze(0).to(self._device)).expand(len(rows), -1, -1)
        build = build_image_prompt if pixels is not None else build_prompt
        prompt = torch.stack([build(row, n_frames) for row in rows]).to(self._device)
        return Prepared(prompt, self._decoder(task, len(rows)), features.expand(len(rows), -1, -1), image_features)

    def _timed_units(self, units: Generator[None, None, Any], timings: Timings, name: str) -> Generator[None, None, Any]:
        """Pass `units` on, adding the time of each unit (not of the pauses between) to `timings.<name>`."""
        while True:
            with self._timed(timings, name):
                try:
                    next(units)
                except StopIteration as done:
                    return done.value
            yield

    def _decoder(self, task: Task, rows: int) -> SpeechDecoder | TextDecoder:
        cost = self.runtime.cost
        return SpeechDecoder(rows == 2, cost) if task.speaks else TextDecoder(cost)

    def _answer(self, task: Task, samples: np.ndarray | None, text_ids: list[int] | None, pixels: torch.Tensor | None,
                cfg: GenerationConfig, cancel: Callable[[], bool], timings: Timings,
                interrupted: Callable[[], bool]) -> Iterator[OmniChunk]:
        self.last_timings = timings
        answer = _Answer(self, task, cfg, timings)
        setup = self._setup(task, samples, text_ids, pixels, cfg, timings, time.perf_counter())
        job = self.scheduler.submit(Job(setup, answer.step, answer.end, cancel, timings.decode_steps.append,
                                        interrupted))
        text = TextStream(self.tokenizer)
        try:
            while (piece := self._next_piece(answer)) is not None:
                if isinstance(piece, BaseException):
                    raise piece
                pcm, steps, final = piece
                for step in steps:
                    text.push(step.text)
                delta = text.delta(final)
                if not final or pcm or delta or steps:
                    yield OmniChunk(pcm, delta, steps)
        finally:
            self.scheduler.close(job)

    def _next_piece(self, answer: _Answer) -> tuple | BaseException | None:
        """The answer's next piece, running the batch's turns on this thread until there is one."""
        self.scheduler.drive_until(lambda: not answer.pieces.empty())
        return answer.pieces.get_nowait()

    def _setup(self, task: Task, samples: np.ndarray | None, text_ids: list[int] | None, pixels: torch.Tensor | None,
               cfg: GenerationConfig, timings: Timings, submitted: float) -> Setup:
        """A request's work before its first decode step, in units: encoder blocks, prefill chunks."""
        timings.queue_wait = time.perf_counter() - submitted  # the scheduler has just started it
        inputs = yield from self._prepare_units(task, samples, text_ids, pixels, timings)
        yield  # the encoder's last unit and the first prefill chunk are two units
        # The request's own randomness: a generator for sampling (SNAC's noise seeds: `_Answer`);
        # torch's global RNG is left as it was, so a seeded answer is the same whatever ran before it.
        sampler = torch.Generator(self._device).manual_seed(cfg.seed) if cfg.seed is not None else None
        sequence = Sequence(self.model, inputs.prompt, inputs.decoder, cfg, inputs.audio_features,
                            inputs.image_features, self.runtime.cost, sampler)
        yield from self._timed_units(sequence.prefill(), timings, "prefill")
        return sequence


class _Answer:
    """The scheduler-side half of one answer: turns its steps into audio as frames complete and
    hands (pcm, steps, final) pieces to the consumer's thread; then None, or the error."""

    def __init__(self, engine: OmniEngine, task: Task, cfg: GenerationConfig, timings: Timings) -> None:
        self.engine, self.timings = engine, timings
        # The answer's own SNAC decoder state; SNAC's noise is seeded from the request's seed.
        self.audio = (engine.codec.stream(cfg.stream_stride, cfg.first_stride, cfg.joins, cfg.seed)
                      if task.speaks else None)
        self.pending: list[Step] = []
        self.pieces: queue.SimpleQueue = queue.SimpleQueue()

    def step(self, step: Step) -> None:
        self.pending.append(step)
        pcm = self.engine._decode_audio(self.audio, step.audio, self.timings) if self.audio is not None else b""
        if pcm or self.audio is None:
            self.pieces.put((pcm, tuple(self.pending), False))
            self.pending = []

    def end(self, error: BaseException | None, cancelled: bool) -> None:
        try:
            if error is not None:
                self.pieces.put(error)
            elif not cancelled:  # the tail the official code drops
                tail = self.engine._decode_audio(self.audio, None, self.timings) if self.audio is not None else b""
                self.pieces.put((tail, tuple(self.pending), True))
        except Exception as e:  # noqa: BLE001 - reported to the consumer, like any failure of its answer
            self.pieces.put(e)
        finally:
            self.pieces.put(None)


def prompt_length(task: Task, samples: np.ndarray | None, text_ids: list[int] | None, image: bool = False) -> int:
    """Positions the prompt of `task` takes: L + 3 for audio input (L + 55 with an image), N + 3 for text."""
    body = feature_frames(samples.size) if samples is not None else len(text_ids or ())
    return body + (IMAGE_PROMPT_EXTRA if image else PROMPT_EXTRA)


def _watcher(cancel: Cancel) -> Callable[[], bool]:
    """The cancel's state read without side effects (`is_set`), if it has one, for the scheduler to
    read between units of work; a plain callable is only polled before decode steps, as documented."""
    is_set = getattr(cancel, "is_set", None)
    return is_set if callable(is_set) else (lambda: False)


def _as_callable(cancel: Cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if callable(cancel):
        return cancel
    raise TypeError(f"cancel must be a threading.Event or a callable, got {type(cancel).__name__}")
