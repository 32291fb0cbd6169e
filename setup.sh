#!/usr/bin/env bash
# Install everything the README's commands and `python -m pytest` need, on Debian or Ubuntu:
#   system packages (apt-get, as root or through sudo):
#     ffmpeg         decodes the audio questions
#     libportaudio2  PortAudio, for the microphone and speaker of realtime_vad_player.py (sounddevice)
#     chromium       the headless browser of the web page tests (Playwright drives it; it downloads none)
#     iproute2       `ip`, for the network namespace of the hands-free page test (WebRTC never uses 127.0.0.1)
#     python3-venv   to make the virtual environment
#     gcc            builds the project's few-row kernels (omni/csrc) on first use; without it the modes
#                    use the library kernels (BLAS, fbgemm)
#   a virtual environment in .venv with requirements.txt and this project (`pip install -e .`).
# PyTorch: the CPU build (from download.pytorch.org/whl/cpu) unless an NVIDIA driver is present
# (nvidia-smi), then PyPI's CUDA build. Force one with --cpu or --gpu.
#
#   ./setup.sh [--cpu | --gpu]      then: . .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")"

CPU_INDEX=https://download.pytorch.org/whl/cpu
VENV=${VENV:-.venv}
torch_build=auto
case "${1:-}" in
  --cpu) torch_build=cpu ;;
  --gpu) torch_build=gpu ;;
  "") ;;
  *) echo "usage: $0 [--cpu | --gpu]" >&2; exit 2 ;;
esac
if [ "$torch_build" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then torch_build=gpu; else torch_build=cpu; fi
fi

missing=()
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
ldconfig -p | grep -q 'libportaudio\.so\.2' || missing+=(libportaudio2)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || missing+=(gcc)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
torch_pin=$(grep -E '^torch==' requirements/runtime.txt | cut -d' ' -f1)
if [ "$torch_build" = cpu ]; then
  echo "installing $torch_pin, CPU build"
  # Only torch from the CPU index (its +cpu wheel outranks PyPI's CUDA one); its dependencies come from PyPI below.
  pip install -q --no-deps "$torch_pin" --extra-index-url "$CPU_INDEX"
else
  echo "installing $torch_pin, CUDA build (PyPI's)"
  pip install -q "$torch_pin"
fi
echo "installing requirements.txt and this project (editable)"
pip install -q -r requirements.txt -e .
echo "done: . $VENV/bin/activate, then python -m pytest"
