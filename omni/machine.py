"""What this machine is and where its per-machine choices live: the one /proc/cpuinfo reader and the
one cache directory (measured product choices, built kernels, the benchmark's checkpoints)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")  # int8 dot products without int16 overflow
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 dot products in hardware (oneDNN emulates them elsewhere, slowly)
CACHE_ENV = "MINI_OMNI_CACHE"
CACHE_NAME = "mini-omni"  # this project's folder in the user's cache directory


def _read_cpuinfo() -> tuple[str, set[str]]:
    """The CPU model and all its flags (ARM64: features), from /proc/cpuinfo (elsewhere: the platform's name,
    no flags)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):  # x86, ARM64
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, flags


def cpu_flags() -> set[str]:
    """Every instruction-set flag the CPU reports."""
    return _read_cpuinfo()[1]


def cpu_info() -> dict[str, object]:
    """CPU model and the instruction-set flags that decide which kernels are fast."""
    model, flags = _read_cpuinfo()
    return {"model": model, "flags": [flag for flag in CPU_FLAGS if flag in flags]}


def has_vnni() -> bool:
    return any(f in cpu_info()["flags"] for f in VNNI_FLAGS)


def onednn_bf16() -> bool:
    """Whether this torch build's oneDNN runs bf16 products on this CPU at all (it refuses on AVX2-only CPUs)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def has_bf16() -> bool:
    """Whether bf16 products run on the CPU's own bf16 units (AVX512-BF16 or AMX) through oneDNN."""
    return any(f in cpu_info()["flags"] for f in BF16_FLAGS) and onednn_bf16()


def user_cache_root() -> Path:
    """The user's cache directory ($XDG_CACHE_HOME, else ~/.cache), shared with other tools' caches."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))


def cache_dir() -> Path:
    """Where this project's per-machine files are kept: $MINI_OMNI_CACHE, else the user's cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return user_cache_root() / CACHE_NAME
