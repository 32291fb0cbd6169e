"""Typed model configuration read from the checkpoint's `model_config.yaml` (spec §2.3)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import CheckpointError
from .tokens import PADDED_AUDIO_VOCAB, PADDED_TEXT_VOCAB, PADDED_VOCAB

CONFIG_FILE = "model_config.yaml"

# Architecture switches of litgpt that Mini-Omni fixes; a file asking for anything else is not
# a Mini-Omni checkpoint and would silently compute something different, so it is refused.
REQUIRED_SETTINGS: dict[str, Any] = {
    "norm_class_name": "RMSNorm",
    "mlp_class_name": "LLaMAMLP",
    "parallel_residual": False,
    "shared_attention_norm": False,
    "rotary_percentage": 1,
    "bias": False,
    "lm_head_bias": False,
    "scale_embeddings": False,
    "asr_adapter": "llamamlp",
    "pos_type": "rope",
    "n_expert": 0,
    "rope_condense_ratio": 1,
}


def _same_kind(value: Any, default: Any) -> bool:
    """Whether a YAML value has the type of the setting's default (None defaults hold integers)."""
    if value is None:
        return default is None
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, int) and value > 0


@dataclass(frozen=True)
class ModelConfig:
    """The dimensions the engine needs; defaults are the released Qwen2-0.5B values."""

    n_embd: int = 896
    n_layer: int = 24
    n_head: int = 14
    n_query_groups: int = 2
    head_size: int = 64
    intermediate_size: int = 4864
    padded_vocab_size: int = PADDED_VOCAB
    text_vocab_size: int = PADDED_TEXT_VOCAB
    audio_vocab_size: int = PADDED_AUDIO_VOCAB
    whisper_adapter_dim: int = 768
    vision_adapter_dim: int | None = None  # present only in Mini-Omni2 checkpoints
    block_size: int = 2048  # positions the KV cache and RoPE tables cover
    norm_eps: float = 1e-6
    rope_base: int = 1_000_000
    add_qkv_bias: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.n_head % self.n_query_groups:
            raise CheckpointError(f"n_head {self.n_head} is not a multiple of n_query_groups {self.n_query_groups}")
        if (self.padded_vocab_size, self.text_vocab_size, self.audio_vocab_size) != (
            PADDED_VOCAB, PADDED_TEXT_VOCAB, PADDED_AUDIO_VOCAB,
        ):
            raise CheckpointError(
                "vocabulary layout differs from Mini-Omni's "
                f"({self.padded_vocab_size}/{self.text_vocab_size}/{self.audio_vocab_size}, "
                f"expected {PADDED_VOCAB}/{PADDED_TEXT_VOCAB}/{PADDED_AUDIO_VOCAB})"
            )

    @property
    def q_per_kv(self) -> int:
        return self.n_head // self.n_query_groups

    @property
    def qkv_size(self) -> int:
        """Rows of the fused QKV projection: per group, q_per_kv queries, one key, one value."""
        return (self.n_head + 2 * self.n_query_groups) * self.head_size

    @property
    def family(self) -> str:
        return "mini-omni2" if self.vision_adapter_dim else "mini-omni"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        for key, wanted in REQUIRED_SETTINGS.items():
            if key in raw and raw[key] != wanted:
                raise CheckpointError(f"unsupported model_config.yaml: {key}={raw[key]!r}, Mini-Omni uses {wanted!r}")
        known = {f.name: f.default for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        for key, value in values.items():
            if not _same_kind(value, known[key]):
                raise CheckpointError(f"model_config.yaml: {key}={value!r} is not a valid value for this setting")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path} not found: a Mini-Omni checkpoint directory holds {CONFIG_FILE}")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror if isinstance(e, OSError) else e}") from e
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            raise CheckpointError(f"{path} is not valid YAML{line}: {getattr(e, 'problem', None) or e}") from e
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} is not a YAML mapping")
        return cls.from_dict(raw)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path) -> "ModelConfig":
        return cls.from_file(Path(ckpt_dir) / CONFIG_FILE)
