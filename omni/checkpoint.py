"""Find, fetch and load the files of an official checkpoint directory (docs/model.md §1).

Weights are memory-mapped and assigned into a model built on the meta device, so loading never
holds two copies of them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.hub import download_url_to_file

from .codec import SNAC_CONFIG, SNAC_HUB_REPO, SNAC_WEIGHTS
from .config import CONFIG_FILE, ModelConfig
from .errors import CheckpointDownloadError, CheckpointError
from .machine import user_cache_root
from .model import OmniLM

WEIGHTS_FILE = "lit_model.pth"
TOKENIZER_FILE = "tokenizer.json"
WHISPER_FILE = "small.pt"
SNAC_DIR = "snac"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
HUB_REPOS = {"mini-omni": "gpt-omni/mini-omni", "mini-omni2": "gpt-omni/mini-omni2"}
FAMILIES = tuple(HUB_REPOS)  # the model families a checkpoint can be downloaded for
# openai-whisper's own download of "small" (its _MODELS table), checked against this sha256.
WHISPER_SMALL_SHA256 = "9ecf779972d90ba49c06d968637d720dd632c55bbf19d441fb42bf17a411e794"
WHISPER_SMALL_URL = f"https://openaipublic.azureedge.net/main/whisper/models/{WHISPER_SMALL_SHA256}/small.pt"
CLIP_FILE = "ViT-B-32.pt"  # Mini-Omni2's image tower, OpenAI's released TorchScript archive
# The clip package's own download of "ViT-B/32", checked against this sha256.
CLIP_VIT_B32_SHA256 = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
CLIP_VIT_B32_URL = f"https://openaipublic.azureedge.net/clip/models/{CLIP_VIT_B32_SHA256}/{CLIP_FILE}"


def fetch_command(family: str, ckpt_dir: str | Path) -> str:
    return f"hf download {HUB_REPOS[family]} --local-dir {ckpt_dir}"


def ensure_checkpoint(ckpt_dir: str | Path, family: str = "mini-omni") -> Path:
    """Return `ckpt_dir`, downloading the official repository first if the directory does not exist."""
    if family not in HUB_REPOS:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(HUB_REPOS)}")
    ckpt_dir = Path(ckpt_dir)
    try:
        if not ckpt_dir.exists():
            download_checkpoint(ckpt_dir, family)
        if ckpt_dir.is_dir():
            os.listdir(ckpt_dir)  # a directory this user may not read fails here, not later with a bare errno
        missing = [name for name in REQUIRED_FILES if not (ckpt_dir / name).is_file()]
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint directory {ckpt_dir}: {e.strerror or e} (check that this user "
                              "may read it and its files)") from e
    if missing:
        raise CheckpointError(
            f"checkpoint directory {ckpt_dir} lacks {', '.join(missing)}. It needs {', '.join(REQUIRED_FILES)} "
            f"(and optionally {WHISPER_FILE}, {SNAC_DIR}/). Fetch them on a connected machine with: "
            f"{fetch_command(family, ckpt_dir)}"
        )
    return ckpt_dir


def download_checkpoint(ckpt_dir: Path, family: str) -> None:
    """Fetch the official model repository with a progress bar; a clear error when that fails."""
    from huggingface_hub import snapshot_download

    repo = HUB_REPOS[family]
    print(f"checkpoint directory {ckpt_dir} not found: downloading {repo} from the Hugging Face Hub")
    try:
        snapshot_download(repo, local_dir=str(ckpt_dir), revision="main")
    except Exception as e:  # the hub client raises many network and HTTP types; all mean "not fetched"
        if ckpt_dir.exists() and not any(ckpt_dir.iterdir()):
            ckpt_dir.rmdir()
        raise CheckpointDownloadError(
            f"could not download {repo} into {ckpt_dir} ({type(e).__name__}: {e}). The directory needs "
            f"{', '.join(REQUIRED_FILES)}; on a connected machine run `{fetch_command(family, ckpt_dir)}` "
            f"and copy the directory here, or pass --ckpt-dir to an existing one"
        ) from e


def load_lm(ckpt_dir: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> OmniLM:
    """Strictly load `lit_model.pth` (official litgpt key names) into an `OmniLM` on `device`."""
    path = ckpt_dir / WEIGHTS_FILE
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    with torch.device("meta"):
        model = OmniLM(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path} does not match {ckpt_dir / CONFIG_FILE}: "
            + "; ".join(f"{label} {items[:4]}{' ...' if len(items) > 4 else ''}"
                        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                        if items)
        )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter; wte wins as in the official load
    return model.to(device).eval()


def whisper_path(ckpt_dir: Path) -> Path:
    """`ckpt_dir/small.pt` if present, else openai-whisper's cached "small" (downloaded if needed)."""
    return _local_or_cached(ckpt_dir / WHISPER_FILE, "whisper", WHISPER_SMALL_URL, WHISPER_SMALL_SHA256)


def clip_path(ckpt_dir: Path) -> Path:
    """`ckpt_dir/ViT-B-32.pt` if present, else the clip package's cached ViT-B/32 (downloaded if needed)."""
    return _local_or_cached(ckpt_dir / CLIP_FILE, "clip", CLIP_VIT_B32_URL, CLIP_VIT_B32_SHA256)


def _local_or_cached(local: Path, cache_name: str, url: str, sha256: str) -> Path:
    if local.is_file():
        return local
    cache = user_cache_root() / cache_name / local.name
    if not cache.is_file():
        download_verified(url, sha256, cache, local.parent)
    return cache


def download_verified(url: str, sha256: str, target: Path, ckpt_dir: Path) -> None:
    """Download `url` to `target` with a progress bar on stderr, checking its sha256 before it is moved into
    place (torch.hub writes a partial file beside it and removes it on any failure)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"{target.name} not in the checkpoint: downloading it to {target}")
    try:
        download_url_to_file(url, str(target), hash_prefix=sha256, progress=True)
    except RuntimeError as e:  # torch.hub's hash mismatch
        raise CheckpointDownloadError(f"downloaded {target.name} failed its sha256 check: {e}") from e
    except OSError as e:
        raise CheckpointDownloadError(
            f"could not download {target.name} ({e}). Put it into the checkpoint directory {ckpt_dir} or "
            f"{target}; on a connected machine: curl -L -o {target.name} {url}"
        ) from e


def snac_dir(ckpt_dir: Path) -> Path:
    """`ckpt_dir/snac/` if present, else the hub's `hubertsiuzdak/snac_24khz` (downloaded if needed)."""
    local = ckpt_dir / SNAC_DIR
    if (local / SNAC_CONFIG).is_file():
        return local
    from huggingface_hub import hf_hub_download

    try:
        for name in (SNAC_CONFIG, SNAC_WEIGHTS):
            path = Path(hf_hub_download(SNAC_HUB_REPO, name))
    except Exception as e:  # network and HTTP errors of the hub client
        raise CheckpointDownloadError(
            f"no {local} and could not download {SNAC_HUB_REPO} ({type(e).__name__}: {e}). On a connected "
            f"machine run `hf download {SNAC_HUB_REPO} --local-dir {local}`"
        ) from e
    return path.parent
