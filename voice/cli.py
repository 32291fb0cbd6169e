"""The `mini-omni-realtime` command (`python realtime_vad_player.py` in a checkout). Talk to the model:
microphone -> Silero VAD -> engine.stream() -> speaker, with barge-in and camera frames.

    python realtime_vad_player.py [--ckpt-dir DIR] [--input-device N] [--output-device N] [--camera 0 | --no-camera]
    python realtime_vad_player.py --input-file q.wav   # no microphone: answers go to output/realtime/turnN.wav
    python realtime_vad_player.py --list-devices
"""
from __future__ import annotations

import argparse
import sys

from omni import AUTO_MODE, DEFAULT_MAX_TOKENS, DEFAULT_STREAM_STRIDE, MODE_HELP, MODE_NAMES, OmniEngine

from .camera import FRAME_INTERVAL_S
from .loop import LoopConfig
from .replay import answer_file as replay_file
from .vad import END_MS, PREROLL_MS, SPEECH_THRESHOLD, START_MS, VadConfig

DEFAULT_CAMERA = 0
DEFAULT_OUT_DIR = "output/realtime"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Speech in, speech out, with barge-in and camera frames.")
    p.add_argument("--ckpt-dir", default="checkpoint", help="checkpoint directory (downloaded if it does not exist)")
    p.add_argument("--device", default="auto", help="engine device: auto, cpu, cuda, ...")
    p.add_argument("--mode", default=AUTO_MODE, choices=MODE_NAMES,
                   help=f"{MODE_HELP}. Default {AUTO_MODE}: a live answer must keep up with its audio")
    p.add_argument("--list-devices", action="store_true", help="list audio devices and cameras, then exit")
    p.add_argument("--input-device", type=int, help="microphone device number (default: the system's)")
    p.add_argument("--output-device", type=int, help="speaker device number (default: the system's)")
    cam = p.add_mutually_exclusive_group()
    cam.add_argument("--camera", type=int, default=DEFAULT_CAMERA,
                     help="camera index (default 0); used only by a model that can see (Mini-Omni2)")
    cam.add_argument("--no-camera", action="store_true", help="send questions without an image")
    p.add_argument("--camera-interval", type=float, default=FRAME_INTERVAL_S, help="seconds between camera frames")
    p.add_argument("--input-file", help="answer a recording instead of the microphone; answers go to wav files")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where --input-file writes turnN.wav")
    p.add_argument("--threshold", type=float, default=SPEECH_THRESHOLD, help="Silero speech probability")
    p.add_argument("--start-ms", type=int, default=START_MS, help="speech this long starts a turn")
    p.add_argument("--end-ms", type=int, default=END_MS, help="silence this long ends a turn")
    p.add_argument("--preroll-ms", type=int, default=PREROLL_MS, help="audio kept from before the onset")
    p.add_argument("--stream-stride", type=int, default=DEFAULT_STREAM_STRIDE, help="decode steps per audio chunk")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="prompt plus answer positions")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from .devices import DeviceError

    try:
        run(args)
    except DeviceError as e:
        sys.exit(f"error: {e}")


def run(args: argparse.Namespace) -> None:
    if args.list_devices:
        from .devices import list_devices
        print(list_devices())
        return
    vad = VadConfig(args.threshold, args.start_ms, args.end_ms, args.preroll_ms)
    config = LoopConfig(vad=vad, stream_stride=args.stream_stride, max_tokens=args.max_tokens)
    camera = None if args.no_camera else args.camera
    if args.input_file:
        answer_file(args, config, camera)
        return
    from .devices import run_live

    run_live(lambda: load_engine(args, warm=True), config, sys.stdout, args.input_device, args.output_device,
             camera, args.camera_interval)


def load_engine(args: argparse.Namespace, warm: bool = False) -> OmniEngine:
    engine = OmniEngine(args.ckpt_dir, device=args.device, mode=args.mode)
    print(f"{engine.mode} mode: {engine.mode_reason}")
    if warm:  # the first live answer should not pay first-call costs
        engine.warmup()
    return engine


def answer_file(args: argparse.Namespace, config: LoopConfig, camera: int | None) -> None:
    from .devices import open_camera

    engine = load_engine(args)
    feed = open_camera(camera, engine, args.camera_interval, sys.stdout)  # only if the model can see
    try:
        for path in replay_file(engine, args.input_file, config, args.out_dir, feed):
            print(f"wrote {path}")
    finally:
        if feed is not None:
            feed.camera.close()


if __name__ == "__main__":
    main()
