"""Benchmark the engine's modes side by side on one machine and one question.

    python bench.py [--ckpt-dir DIR] [--device cpu|cuda] [--modes baseline,exact,fast] [--runs N] [--json out.json]
    python bench.py --image data/samples/image1.jpg --modes exact    # Mini-Omni2: the image's extra cost

Each mode runs in its own process (so peak memory is its own). `baseline` reproduces the official
implementation's cost structure in our code (fp32, full head on both rows, attention over the
whole 2048-long cache, 30 s encoder), so every speed-up is a ratio measured in the same run.
Without --ckpt-dir a full-size random checkpoint is made once and cached (Mini-Omni2 with --image).
With --image every mode also answers the same question without the image, in the same process, and
reports the difference.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

from omni.codec import OUTPUT_SAMPLE_RATE, SAMPLES_PER_FRAME

ROOT = Path(__file__).resolve().parent
DEFAULT_INPUT = ROOT / "data" / "samples" / "output4.wav"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mini-omni" / "bench-full"
CACHE_DIR_V2 = CACHE_DIR.with_name("bench-full-v2")
FRAME_MS = SAMPLES_PER_FRAME / OUTPUT_SAMPLE_RATE * 1000  # audio per decode step: real time needs a step under this
DEFAULT_STEPS = 40  # decode steps per request after the prompt


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timers:
    """Wraps callables to record how long each call takes."""

    def __init__(self, sync) -> None:
        self.samples: dict[str, list[float]] = {}
        self.sync = sync

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.samples.setdefault(name, []).append(time.perf_counter() - start)
            return out
        return timed

    def clear(self) -> None:
        self.samples.clear()


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def question(path: Path) -> dict:
    """The question as `engine.stream` arguments: the file itself, or (without ffmpeg) its samples."""
    if shutil.which("ffmpeg"):
        return {"audio": str(path)}
    import numpy as np

    with wave.open(str(path)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2, "without ffmpeg the question must be a mono 16-bit WAV"
        return {"audio": np.frombuffer(w.readframes(w.getnframes()), "<i2"), "sample_rate": w.getframerate()}


def one_request(engine, audio: dict, max_tokens: int, timers: Timers) -> dict:
    timers.clear()
    start = time.perf_counter()
    first, steps, pcm = None, 0, 0
    for chunk in engine.stream(**audio, max_tokens=max_tokens):  # audio: the question's stream() arguments
        if first is None and chunk.pcm:
            first = time.perf_counter() - start
        steps += len(chunk.steps)
        pcm += len(chunk.pcm)
    total = time.perf_counter() - start
    prefill_calls = timers.samples.get("forward_in_prefill", [0])[0]  # forward calls the prefill made
    return {"first_chunk_s": first, "total_s": total, "steps": steps, "audio_s": pcm / 2 / OUTPUT_SAMPLE_RATE,
            "audio_decode_s": sum(timers.samples.get("audio_decode", [])), "mel_s": sum(timers.samples.get("mel", [])),
            "encoder_s": sum(timers.samples.get("encoder", [])), "prefill_s": timers.samples["prefill"][0],
            "image_load_s": sum(timers.samples.get("image_load", [])), "clip_s": sum(timers.samples.get("clip", [])),
            "decode_steps_s": timers.samples["forward"][int(prefill_calls):],
            "snac_chunk_s": timers.samples.get("snac", [])}


def child(args: argparse.Namespace) -> dict:
    """Measure one mode in this process."""
    import torch

    import omni.engine as engine_module
    from omni.tokens import Task
    from omni_engine import OmniEngine

    start = time.perf_counter()
    engine = OmniEngine(args.ckpt_dir, device=args.device, mode=args.child)
    load_s = time.perf_counter() - start
    rss_loaded, peak_loading = rss_now_mb(), peak_rss_mb()
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    timers = Timers(sync)
    engine_module.load_audio = timers.wrap("audio_decode", engine_module.load_audio)
    engine_module.log_mel = timers.wrap("mel", engine_module.log_mel)
    engine.whisper.forward = timers.wrap("encoder", engine.whisper.forward)
    engine.model.forward = timers.wrap("forward", engine.model.forward)
    import omni.generate as generate_module

    def counted_prefill(*a, **k):
        before = len(timers.samples.get("forward", []))
        out = generate_module_prefill(*a, **k)
        timers.samples["forward_in_prefill"] = [len(timers.samples["forward"]) - before]
        return out

    generate_module_prefill = generate_module.prefill
    generate_module.prefill = timers.wrap("prefill", counted_prefill)
    engine.codec.decode = timers.wrap("snac", engine.codec.decode)
    from omni.audio import load_audio

    audio = question(args.input)
    samples = load_audio(audio["audio"], audio.get("sample_rate"))
    max_tokens = engine_module.prompt_length(Task.A1A2, samples, None) + 1 + args.steps
    plain = [one_request(engine, audio, max_tokens, timers) for _ in range(args.runs + 1)] if args.image else []
    if args.image:
        engine_module.load_image = timers.wrap("image_load", engine_module.load_image)
        engine.vision.forward = timers.wrap("clip", engine.vision.forward)
        audio = {**audio, "image": str(args.image)}
        max_tokens = engine_module.prompt_length(Task.A1A2, samples, None, image=True) + 1 + args.steps
    runs = [one_request(engine, audio, max_tokens, timers) for _ in range(args.runs + 1)]
    cold, warm = runs[0], runs[1:]
    steps = [s for r in warm for s in r["decode_steps_s"]]
    step_p50 = p(steps, 0.5)
    result = {
        "load_s": load_s, "rss_after_load_mb": rss_loaded, "peak_rss_loading_mb": peak_loading,
        "audio_decode_s": statistics.median(r["audio_decode_s"] for r in warm),
        "mel_s": statistics.median(r["mel_s"] for r in warm),
        "encoder_s": statistics.median(r["encoder_s"] for r in warm),
        "prefill_s": statistics.median(r["prefill_s"] for r in warm),
        "decode_step_ms_p50": step_p50 * 1000, "decode_step_ms_p90": p(steps, 0.9) * 1000,
        "snac_chunk_ms_p50": p([s for r in warm for s in r["snac_chunk_s"]], 0.5) * 1000,
        "first_chunk_s": statistics.median(r["first_chunk_s"] for r in warm), "first_chunk_cold_s": cold["first_chunk_s"],
        "total_s": statistics.median(r["total_s"] for r in warm), "steps": warm[0]["steps"],
        "rtf": step_p50 * 1000 / FRAME_MS, "peak_rss_mb": peak_rss_mb(), "steady_rss_mb": rss_now_mb(),
    }
    if args.image:
        result.update(image_load_s=statistics.median(r["image_load_s"] for r in warm),
                      clip_s=statistics.median(r["clip_s"] for r in warm),
                      prefill_no_image_s=statistics.median(r["prefill_s"] for r in plain[1:]),
                      first_chunk_no_image_s=statistics.median(r["first_chunk_s"] for r in plain[1:]))
        result["image_extra_ms"] = (result["first_chunk_s"] - result["first_chunk_no_image_s"]) * 1000
    if args.reference:
        from omni.generate import Step, teacher_forced_agreement

        ref = json.loads(Path(args.reference).read_text())
        steps_ref = [Step(tuple(s[i] for s in ref[:7]), ref[7][i]) for i in range(len(ref[7]))]
        inputs = engine.prepare(Task.A1A2, samples, None)
        result["teacher_forced_top1"] = teacher_forced_agreement(engine.model, inputs.prompt, inputs.decoder, steps_ref,
                                                                 inputs.audio_features)
    if args.dump_streams:
        Path(args.dump_streams).write_text(json.dumps(engine.run(**audio, max_tokens=max_tokens).streams))
    return result


def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "device": device, "platform": platform.platform()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_mode(mode: str, args: argparse.Namespace, tmp: Path, reference: Path | None, dump: Path | None) -> dict:
    out = tmp / f"{mode}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--ckpt-dir", str(args.ckpt_dir),
           "--device", args.device, "--runs", str(args.runs), "--steps", str(args.steps), "--input", str(args.input),
           "--child-out", str(out)]
    if args.image:
        cmd += ["--image", str(args.image)]
    if reference:
        cmd += ["--reference", str(reference)]
    if dump:
        cmd += ["--dump-streams", str(dump)]
    print(f"measuring {mode} ...", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


ROWS = [("load_s", "load (s)"), ("rss_after_load_mb", "RSS after load (MB)"), ("peak_rss_loading_mb", "peak RSS loading (MB)"),
        ("audio_decode_s", "audio decode (s)"), ("mel_s", "mel (s)"), ("encoder_s", "encoder (s)"),
        ("image_load_s", "image load (s)"), ("clip_s", "CLIP (s)"), ("prefill_no_image_s", "prefill, no image (s)"),
        ("prefill_s", "prefill (s)"), ("decode_step_ms_p50", "decode step p50 (ms)"), ("decode_step_ms_p90", "decode step p90 (ms)"),
        ("snac_chunk_ms_p50", "SNAC per chunk (ms)"), ("first_chunk_s", "first chunk (s)"),
        ("first_chunk_no_image_s", "first chunk, no image (s)"), ("image_extra_ms", "image's extra cost (ms)"),
        ("first_chunk_cold_s", "first chunk, 1st request (s)"), ("total_s", "total (s)"), ("rtf", "real-time factor"),
        ("peak_rss_mb", "peak RSS (MB)"), ("steady_rss_mb", "steady RSS (MB)")]


def print_table(report: dict) -> None:
    modes = list(report["modes"])
    print(f"\n{'':30}" + "".join(f"{m:>12}" for m in modes))
    for key, label in ROWS:
        if all(key not in report["modes"][m] for m in modes):
            continue
        print(f"{label:30}" + "".join(f"{report['modes'][m].get(key, float('nan')):12.3f}" for m in modes))
    for mode, ratios in report.get("speedup_vs_baseline", {}).items():
        print(f"{mode} vs baseline: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))
    for mode, data in report["modes"].items():
        if "teacher_forced_top1" in data:
            print(f"{mode} teacher-forced top-1 agreement with exact (streams 0-6 audio, 7 text): "
                  + " ".join(f"{a:.3f}" for a in data["teacher_forced_top1"]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt-dir", type=Path, help=f"checkpoint (default: a full-size random one cached in {CACHE_DIR})")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", default="baseline,exact,fast")
    ap.add_argument("--runs", type=int, default=3, help="measured requests per mode, after one cold request")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="decode steps per request")
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="the question")
    ap.add_argument("--image", type=Path, help="ask about this image too (a Mini-Omni2 checkpoint)")
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    ap.add_argument("--dump-streams", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(args)))
        return
    if args.ckpt_dir is None:
        family = "mini-omni2" if args.image else "mini-omni"
        args.ckpt_dir = CACHE_DIR_V2 if args.image else CACHE_DIR
        if not (args.ckpt_dir / "lit_model.pth").is_file():
            from utils.make_checkpoint import make_checkpoint

            print(f"making a full-size random {family} checkpoint in {args.ckpt_dir} (once)")
            make_checkpoint(args.ckpt_dir, "full", seed=0, family=family)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    order = sorted(modes, key=lambda m: m != "exact")  # exact first: the others are compared with it
    report = {"machine": machine(args.device), "input": str(args.input), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="omni-bench-") as tmp:
        tmp = Path(tmp)
        # fast mode's agreement with exact is measured on the plain question (not with --image)
        reference = tmp / "exact_streams.json" if "exact" in modes and not args.image else None
        for mode in order:
            report["modes"][mode] = run_mode(mode, args, tmp, reference if mode != "exact" else None,
                                             reference if mode == "exact" else None)
    report["modes"] = {m: report["modes"][m] for m in modes}
    if "baseline" in modes:
        base = report["modes"]["baseline"]
        report["speedup_vs_baseline"] = {
            m: {"decode_step": base["decode_step_ms_p50"] / d["decode_step_ms_p50"],
                "first_chunk": base["first_chunk_s"] / d["first_chunk_s"]}
            for m, d in report["modes"].items() if m != "baseline"}
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
