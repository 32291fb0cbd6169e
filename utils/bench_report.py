"""bench.py's tables: one column per mode, and the many-at-once table."""
from __future__ import annotations

ROWS = [("load_s", "load (s)"), ("audio_decode_s", "audio decode (s)"), ("mel_s", "mel (s)"),
        ("encoder_s", "encoder (s)"), ("image_load_s", "image load (s)"), ("clip_s", "CLIP (s)"),
        ("prefill_no_image_s", "prefill, no image (s)"), ("prefill_s", "prefill (s)"),
        ("decode_step_ms_p50", "decode step p50 (ms)"), ("decode_step_ms_p90", "decode step p90 (ms)"),
        ("decode_step_ms_best", "decode step best (ms)"), ("step_bytes_mb", "bytes read per step (MB)"),
        ("bandwidth_gbs", "streaming bandwidth (GB/s)"), ("floor_ms", "memory floor (ms)"),
        ("floor_multiple", "step p50 / floor"), ("floor_multiple_best", "best step / floor"),
        ("vs_official", "step: official / this"), ("snac_chunk_ms_p50", "SNAC per chunk (ms)"),
        ("first_chunk_s", "first chunk (s)"), ("first_chunk_no_image_s", "first chunk, no image (s)"),
        ("image_extra_ms", "image's extra cost (ms)"), ("first_chunk_cold_s", "first chunk, 1st request (s)"),
        ("total_s", "total (s)"), ("rtf", "real-time factor"), ("rss_after_load_mb", "RSS after load (MB)"),
        ("peak_rss_mb", "peak RSS (MB)"), ("steady_rss_mb", "steady RSS (MB)")]


def print_concurrency(report: dict) -> None:
    print(f"\n{'mode':6}{'answers':>8}{'step (ms)':>11}{'x step(1)':>10}{'RTF p50':>9}{'RTF worst':>10}"
          f"{'audio s/wall s':>15}{'1st chunk p50':>14}{'p90 (s)':>8}")
    for mode, data in report["modes"].items():
        rows = data.get("concurrency", [])
        one = next((r["step_ms"] for r in rows if r["answers"] == 1), None)
        for r in rows:
            ratio = r["step_ms"] / one if one and r["step_ms"] else float("nan")
            print(f"{mode:6}{r['answers']:>8}{r['step_ms'] or float('nan'):>11.1f}{ratio:>10.2f}{r['rtf_p50']:>9.2f}"
                  f"{r['rtf_worst']:>10.2f}{r['audio_per_wall_s']:>15.2f}{r['first_chunk_p50_s']:>14.2f}"
                  f"{r['first_chunk_p90_s']:>8.2f}")


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"\nCPU: {m['cpu']} ({m['cores']} cores, {m['cpu_threads']} torch threads), flags: {' '.join(m['cpu_flags'])}; "
          f"torch {m['torch']}; load average {m['load_avg_start']:.1f} at start, {m['load_avg_end']:.1f} at end")
    modes = list(report["modes"])
    width = max(12, *(len(mode) + 2 for mode in modes))
    print(f"{'':30}" + "".join(f"{mode:>{width}}" for mode in modes))
    for key, label in ROWS:
        if all(key not in report["modes"][mode] for mode in modes):
            continue
        print(f"{label:30}" + "".join(f"{report['modes'][mode].get(key, float('nan')):{width}.3f}" for mode in modes))
    for mode, data in report["modes"].items():
        if data.get("products"):
            print(f"{mode} products (1 row/2 rows): " + ", ".join(f"{k} {v}" for k, v in data["products"].items()))
        for key, label in (("teacher_forced_top1", "top-1 agreement"), ("teacher_forced_kl", "mean KL")):
            if key in data:
                print(f"{mode} vs exact, teacher-forced {label} (streams 0-6 audio, 7 text): "
                      + " ".join(f"{a:.3f}" for a in data[key]))
    if "auto" in report:
        print(f"auto chose {report['auto']['mode']}: {report['auto']['reason']}")
