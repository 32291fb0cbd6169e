"""Benchmark the engine's modes on one machine and one question, against the official cost and the memory floor.

    python bench.py [--ckpt-dir DIR] [--device cpu|cuda] [--modes baseline,exact,fast] [--runs N] [--rounds R] [--json out.json]
    python bench.py --fidelity --ckpt-dir DIR     # fast mode's agreement with exact only, on any checkpoint
    python bench.py --image data/samples/image1.jpg --modes exact    # Mini-Omni2: the image's extra cost
    python bench.py --modes exact,fast --concurrency 1,2,4,8 --steps 120   # many conversations at once
    python bench.py --modes fast:q8avx2     # fast mode with its int8 products forced (MINI_OMNI_INT8)

Each mode runs in its own process (so peak memory is its own); `--rounds` repeats the modes in turn
and takes medians, so a machine shared with other work slows every mode alike. `baseline` is the
official implementation's cost structure in our code (fp32 `F.linear` products, full head on
both rows, attention over the whole 2048-long cache, both prompt rows prefilled, 30 s encoder).

The memory floor: a decode step must read every weight it multiplies (and the filled KV cache)
once, so it cannot beat bytes read per step / memory bandwidth. Each mode measures that
bandwidth on its own step's tensors (a streaming read, best of several passes) and reports its
decode step as a multiple of the floor. Fidelity: fast (and baseline) are fed exact's greedy answer
(teacher forcing); per stream, how often their greedy pick equals exact's token (top-1) and the
mean KL divergence of their distribution from exact's.
`--concurrency N,...`: N answers asked at the same moment, decoded in one batch; per N the decode
step time (all N in the step), each answer's real-time factor after its first chunk, seconds of
answer audio per wall second over all N, and first chunk p50/p90 (the later arrivals wait for the
earlier ones' encoder and prefill).
With fast among the modes, each int8 kernel this machine runs gets a row of its own, forced
(`fast:fbgemm`, `fast:q8avx2`...; the `fast` row is the measured choice), unless --no-kernel-rows. The
report ends with what `--mode auto` chose here and why (a load in auto mode, its own process).
Without --ckpt-dir a full-size random checkpoint is made once and cached (Mini-Omni2 with --image).
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

from omni import OUTPUT_SAMPLE_RATE, SECONDS_PER_FRAME, Step, Task, prompt_length
from omni.machine import cache_dir, cpu_info
from utils.bench_model import memory_floor, products_summary
from utils.bench_report import print_concurrency, print_table

ROOT = Path(__file__).resolve().parent
DEFAULT_INPUT = ROOT / "data" / "samples" / "output4.wav"
CACHE_DIR = cache_dir() / "bench-full"
CACHE_DIR_V2 = CACHE_DIR.with_name("bench-full-v2")
DEFAULT_STEPS = 40  # decode steps per request after the prompt
KERNEL_SEP = ":"  # "fast:q8avx2": a mode with its int8 products forced
AUTO = "auto"  # the child that only loads in auto mode and says what it chose


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


# ---- one mode, in its own process ----------------------------------------------------------------

def one_request(engine, audio: dict, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, steps, pcm = None, 0, 0
    for chunk in engine.stream(**audio, max_tokens=max_tokens):  # audio: the question's stream() arguments
        if first is None and chunk.pcm:
            first = time.perf_counter() - start
        steps += len(chunk.steps)
        pcm += len(chunk.pcm)
    t = engine.last_timings
    return {"first_chunk_s": first, "total_s": time.perf_counter() - start, "steps": steps,
            "audio_s": pcm / 2 / OUTPUT_SAMPLE_RATE, "audio_decode_s": t.audio_decode, "mel_s": t.mel,
            "encoder_s": t.encoder, "prefill_s": t.prefill, "image_load_s": t.image_load, "clip_s": t.clip,
            "decode_steps_s": t.decode_steps, "snac_chunk_s": t.snac}


def timing(engine, args: argparse.Namespace, audio: dict, samples) -> dict:
    image = {"image": str(args.image)} if args.image else {}
    prompt = prompt_length(Task.A1A2, samples, None, image=bool(args.image))
    max_tokens = prompt + 1 + args.steps
    plain = [one_request(engine, audio, max_tokens - prompt + prompt_length(Task.A1A2, samples, None))
             for _ in range(args.runs + 1)] if args.image else []
    runs = [one_request(engine, {**audio, **image}, max_tokens) for _ in range(args.runs + 1)]
    cold, warm = runs[0], runs[1:]
    steady_rss = rss_now_mb()  # before the floor's probe buffers, which are no part of serving
    floor = memory_floor(engine, prompt + args.steps // 2)
    steps = [s for r in warm for s in r["decode_steps_s"]]
    med = {k: statistics.median(r[k] for r in warm) for k in
           ("audio_decode_s", "mel_s", "encoder_s", "prefill_s", "first_chunk_s", "total_s", "image_load_s", "clip_s")}
    result = {**med, "decode_step_ms_p50": p(steps, 0.5) * 1000, "decode_step_ms_p90": p(steps, 0.9) * 1000,
              "decode_step_ms_best": min(steps) * 1000, **floor,
              "snac_chunk_ms_p50": p([s for r in warm for s in r["snac_chunk_s"]], 0.5) * 1000,
              "first_chunk_cold_s": cold["first_chunk_s"], "steps": warm[0]["steps"],
              "rtf": p(steps, 0.5) / SECONDS_PER_FRAME, "peak_rss_mb": peak_rss_mb(), "steady_rss_mb": steady_rss}
    result["floor_multiple"] = result["decode_step_ms_p50"] / floor["floor_ms"]
    result["floor_multiple_best"] = result["decode_step_ms_best"] / floor["floor_ms"]
    if not args.image:
        for key in ("image_load_s", "clip_s"):
            del result[key]
    else:
        result["prefill_no_image_s"] = statistics.median(r["prefill_s"] for r in plain[1:])
        result["first_chunk_no_image_s"] = statistics.median(r["first_chunk_s"] for r in plain[1:])
        result["image_extra_ms"] = (result["first_chunk_s"] - result["first_chunk_no_image_s"]) * 1000
    return result


def concurrent_answers(engine, audio: dict, max_tokens: int, n: int) -> dict:
    """`n` answers to the question asked at the same moment, read in turn by one thread as the server's
    engine thread reads its requests' chunks (each `next` runs the batch until that answer has one)."""
    stats = engine.scheduler.stats
    before = {b: (c, stats.step_seconds[b]) for b, c in stats.steps.items()}
    start = time.perf_counter()
    streams = [engine.stream(**audio, max_tokens=max_tokens) for _ in range(n)]
    runs = [{"first": None, "last": None, "pcm": 0, "first_pcm": 0} for _ in range(n)]
    live = set(range(n))
    while live:
        for i in sorted(live):
            chunk = next(streams[i], None)
            if chunk is None:
                live.discard(i)
            elif chunk.pcm:
                r = runs[i]
                r["last"] = time.perf_counter() - start
                if r["first"] is None:
                    r["first"], r["first_pcm"] = r["last"], len(chunk.pcm)
                r["pcm"] += len(chunk.pcm)
    wall = time.perf_counter() - start
    c0, s0 = before.get(n, (0, 0.0))
    full_steps = stats.steps.get(n, 0) - c0
    rtf = [(r["last"] - r["first"]) / ((r["pcm"] - r["first_pcm"]) / 2 / OUTPUT_SAMPLE_RATE) for r in runs]
    first = [r["first"] for r in runs]
    return {"answers": n, "step_ms": (stats.step_seconds.get(n, 0.0) - s0) / full_steps * 1000 if full_steps else None,
            "full_batch_steps": full_steps, "rtf_p50": p(rtf, 0.5), "rtf_worst": max(rtf),
            "audio_per_wall_s": sum(r["pcm"] for r in runs) / 2 / OUTPUT_SAMPLE_RATE / wall,
            "first_chunk_p50_s": p(first, 0.5), "first_chunk_p90_s": p(first, 0.9), "wall_s": wall}


def concurrency(engine, args: argparse.Namespace, audio: dict, samples) -> list[dict]:
    max_tokens = prompt_length(Task.A1A2, samples, None) + 1 + args.steps
    out = []
    for n in args.concurrency:
        concurrent_answers(engine, audio, max_tokens, n)  # warm: the first batch of each size pays first-call costs
        out.append(concurrent_answers(engine, audio, max_tokens, n))
        print(f"  {args.child}: {n} at once: {json.dumps(out[-1])}", flush=True)
    return out


def reference_steps(streams: list[list[int]]) -> list:
    return [Step(tuple(s[i] for s in streams[:7]), streams[7][i]) for i in range(len(streams[7]))]


def fidelity_part(engine, args: argparse.Namespace, audio: dict, samples) -> dict:
    """exact: answer greedily and save the answer and its teacher-forced logits; others: compare with them."""
    import torch

    from utils.fidelity import fidelity, teacher_forced_logits

    max_tokens = prompt_length(Task.A1A2, samples, None) + 1 + args.steps
    inputs = engine.prepare(Task.A1A2, samples, None)
    if args.child == "exact":
        streams = engine.run(**audio, max_tokens=max_tokens, top_k=1).streams
        logits = [(a.clone(), t.clone()) for a, t in teacher_forced_logits(
            engine.model, inputs.prompt, inputs.decoder, reference_steps(streams), inputs.audio_features)]
        torch.save({"streams": streams, "logits": logits}, args.reference)
        return {}
    ref = torch.load(args.reference)
    out = fidelity(engine.model, inputs.prompt, inputs.decoder, reference_steps(ref["streams"]),
                   inputs.audio_features, ref["logits"])
    return {"teacher_forced_top1": out["top1"], "teacher_forced_kl": out["kl"]}


def child(args: argparse.Namespace) -> dict:
    """Measure one mode in this process (its int8 kernel forced by the parent, through the environment)."""
    from omni import OmniEngine, load_audio

    start = time.perf_counter()
    engine = OmniEngine(args.ckpt_dir, device=args.device, mode=args.child.partition(KERNEL_SEP)[0],
                        max_batch=max(args.concurrency) if args.concurrency else None)
    if args.child == AUTO:
        return {"mode": engine.mode, "reason": engine.mode_reason, "load_s": time.perf_counter() - start}
    result = {"load_s": time.perf_counter() - start, "rss_after_load_mb": rss_now_mb(),
              "peak_rss_loading_mb": peak_rss_mb(), "products": products_summary(engine)}
    audio = question(args.input)
    samples = load_audio(audio["audio"], audio.get("sample_rate"))
    if not args.fidelity_only:
        result.update(timing(engine, args, audio, samples))
    if args.concurrency:
        result["concurrency"] = concurrency(engine, args, audio, samples)
    if args.reference:
        result.update(fidelity_part(engine, args, audio, samples))
    return result


# ---- the parent: machine, modes in rounds, table ---------------------------------------------------

def machine(device: str) -> dict:
    import torch

    cpu = cpu_info()
    info = {"cpu": cpu["model"], "cpu_flags": cpu["flags"], "cores": os.cpu_count(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "python": platform.python_version(), "device": device,
            "load_avg_start": os.getloadavg()[0]}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def kernel_rows(modes: list[str], args: argparse.Namespace) -> list[str]:
    """A fast-mode row per int8 kernel this machine runs, each forced."""
    if "fast" not in modes or args.no_kernel_rows or args.device != "cpu":
        return []
    from omni.runtime import available_int8_kernels

    return [f"fast{KERNEL_SEP}{kernel}" for kernel in available_int8_kernels()]


def run_mode(mode: str, args: argparse.Namespace, tmp: Path, reference: Path | None) -> dict:
    out = tmp / f"{mode}.json"
    kernel = mode.partition(KERNEL_SEP)[2]
    env = {**os.environ, "MINI_OMNI_INT8": kernel} if kernel else None
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--ckpt-dir", str(args.ckpt_dir),
           "--device", args.device, "--runs", str(args.runs), "--steps", str(args.steps), "--input", str(args.input),
           "--child-out", str(out)]
    if args.image:
        cmd += ["--image", str(args.image)]
    if reference:
        cmd += ["--reference", str(reference)]
    if args.fidelity:
        cmd += ["--fidelity-only"]
    if args.concurrency:
        cmd += ["--concurrency", ",".join(map(str, args.concurrency))]
    print(f"measuring {mode} ...", flush=True)
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def combine(rounds: list[dict]) -> dict:
    """Medians over rounds of every number; the rest from the first round."""
    out = dict(rounds[0])
    for key, value in rounds[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in rounds if key in r)
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt-dir", type=Path, help=f"checkpoint (default: a full-size random one cached in {CACHE_DIR})")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", default="baseline,exact,fast")
    ap.add_argument("--runs", type=int, default=3, help="measured requests per mode, after one cold request")
    ap.add_argument("--rounds", type=int, default=1, help="run the modes in turn this many times; medians")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="decode steps per request")
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="the question")
    ap.add_argument("--image", type=Path, help="ask about this image too (a Mini-Omni2 checkpoint)")
    ap.add_argument("--fidelity", action="store_true", help="only fast mode's agreement with exact (no timing)")
    ap.add_argument("--concurrency", type=lambda v: [int(n) for n in v.split(",")], default=[],
                    help="also answer N questions at once, for each N in this list (e.g. 1,2,4,8)")
    ap.add_argument("--no-kernel-rows", action="store_true", help="no forced row per int8 kernel")
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--codec", action="store_true", help="SNAC's decoders only: gapless vs official (bench_codec)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    ap.add_argument("--fidelity-only", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
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
    if args.codec:
        from utils.bench_codec import main as bench_codec

        extra = ["--json", str(args.json)] if args.json else []
        bench_codec(["--ckpt-dir", str(args.ckpt_dir), "--device", args.device, *extra])
        return
    modes = [m.strip() for m in ("exact,fast" if args.fidelity and args.modes == "baseline,exact,fast"
                                 else args.modes).split(",") if m.strip()]
    modes += [m for m in kernel_rows(modes, args) if m not in modes]
    order = sorted(modes, key=lambda m: m != "exact")  # exact first: the others are compared with it
    report = {"machine": machine(args.device), "input": str(args.input), "rounds": args.rounds, "modes": {}}
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="omni-bench-") as tmp:
        tmp = Path(tmp)
        # agreement with exact is measured on the plain question (not with --image)
        reference = tmp / "exact_reference.pt" if "exact" in modes and not args.image else None
        for r in range(args.rounds):
            for mode in order:
                rounds[mode].append(run_mode(mode, args, tmp, reference if (r == 0 or args.fidelity) else None))
        if not args.fidelity:
            report[AUTO] = run_mode(AUTO, args, tmp, None)
    report["modes"] = {m: combine(rounds[m]) for m in modes}
    report["machine"]["load_avg_end"] = os.getloadavg()[0]
    if "baseline" in modes and not args.fidelity:
        official = report["modes"]["baseline"]["decode_step_ms_p50"]
        for data in report["modes"].values():
            data["vs_official"] = official / data["decode_step_ms_p50"]
    print_table(report)
    if args.concurrency:
        print_concurrency(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
