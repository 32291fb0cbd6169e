"""Write a complete official-format checkpoint directory with seeded random weights.

    python -m utils.make_checkpoint OUT_DIR --preset tiny|full [--family mini-omni2] [--seed N] [--likely-stop]

Files: model_config.yaml, lit_model.pth (litgpt keys, lm_head stored beside wte as in the
release), tokenizer.json (+ tokenizer_config.json), Whisper small.pt (openai-whisper's format,
fp16) and snac/ (config.json + pytorch_model.bin with legacy weight-norm keys, as on the hub).
Mini-Omni2 adds `vision_adapter_dim` and `vision_adapter.*` and a CLIP ViT-B-32.pt (a TorchScript
archive with CLIP's full image and text parameter layout, fp16 where OpenAI's file is).
A random model speaks noise; these files exist to test structure, tokens and timing.
"""
from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from omni.audio import OUTPUT_SAMPLE_RATE
from omni.checkpoint import CLIP_FILE, HUB_REPOS, SNAC_DIR, TOKENIZER_FILE, WEIGHTS_FILE, WHISPER_FILE
from omni.clip import ResidualBlock, VisionTower, fp16_valued
from omni.codec import LEGACY_NORM_KEYS, PARAM_NORM_KEYS, SNAC_CONFIG, SNAC_WEIGHTS, snac_class
from omni.config import CONFIG_FILE, ModelConfig
from omni.model import OmniLM
from omni.tokens import (
    AUDIO_CODES, EOA, EOT, N_AUDIO_LAYERS, PADDED_AUDIO_VOCAB, PADDED_TEXT_VOCAB, STOP_LAYER, TEXT_VOCAB, audio_id,
)
from omni.image import IMAGE_SIZE
from omni.whisper import WhisperEncoder, sinusoids

# The released model_config.yaml (docs/model.md §1); presets override the dimensions only.
OFFICIAL_YAML = {
    "add_qkv_bias": True, "asr_adapter": "llamamlp", "attn_dropout": 0.0, "bias": False, "block_size": 2048,
    "force_align": False, "gelu_approximate": "none", "head_size": 64,
    "hf_config": {"name": "Qwen2-0.5B", "org": "Qwen"}, "intermediate_size": 4864, "lm_head_bias": False,
    "mlp_class_name": "LLaMAMLP", "n_embd": 896, "n_expert": 0, "n_expert_per_token": 0, "n_head": 14,
    "n_layer": 24, "n_query_groups": 2, "name": "Qwen2-0.5B", "norm_class_name": "RMSNorm", "norm_eps": 1.0e-06,
    "padded_vocab_size": 181120, "padding_multiple": 512, "parallel_residual": False, "pos_type": "rope",
    "post_adapter": False, "post_adapter_layers": 6, "prompt_vocab_size": None, "rope_base": 1000000,
    "rope_condense_ratio": 1, "rotary_percentage": 1, "scale_embeddings": False, "shared_attention_norm": False,
    "tie_word_embeddings": True, "use_pretrain_phoneme_emb": False, "vocab_size": 50254,
    "text_vocab_size": 152000, "cat_audio_vocab_size": 29120, "audio_vocab_size": 4160, "whisper_adapter_dim": 768,
}


@dataclass(frozen=True)
class WhisperDims:
    """openai-whisper's ModelDimensions, stored in the file as `dims`."""

    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 768
    n_audio_head: int = 12
    n_audio_layer: int = 12
    n_vocab: int = 51865
    n_text_ctx: int = 448
    n_text_state: int = 768
    n_text_head: int = 12
    n_text_layer: int = 12


@dataclass(frozen=True)
class ClipDims:
    """CLIP ViT-B/32's sizes (image tower and the text tower its file also holds)."""

    vision_width: int = 768
    vision_layers: int = 12
    patch_size: int = 32
    embed_dim: int = 512  # the projected width: Mini-Omni2's vision_adapter_dim
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12


@dataclass(frozen=True)
class Preset:
    lm: dict
    whisper: WhisperDims
    snac: dict
    tokenizer_vocab: int
    clip: ClipDims


SNAC_24KHZ = {  # hubertsiuzdak/snac_24khz config.json
    "sampling_rate": OUTPUT_SAMPLE_RATE, "encoder_dim": 48, "encoder_rates": [2, 4, 8, 8], "decoder_dim": 1024,
    "decoder_rates": [8, 8, 4, 2], "attn_window_size": None, "codebook_size": 4096, "codebook_dim": 8,
    "vq_strides": [4, 2, 1], "noise": True, "depthwise": True,
}
PRESETS = {
    "full": Preset({}, WhisperDims(), SNAC_24KHZ, tokenizer_vocab=4000, clip=ClipDims()),
    "tiny": Preset(
        dict(n_embd=64, n_layer=2, n_head=4, n_query_groups=2, head_size=16, intermediate_size=128,
             whisper_adapter_dim=64),
        WhisperDims(n_audio_state=64, n_audio_head=2, n_audio_layer=2, n_text_state=64, n_text_head=2, n_text_layer=1),
        {**SNAC_24KHZ, "encoder_dim": 8, "decoder_dim": 64},
        tokenizer_vocab=1000,
        clip=ClipDims(vision_width=64, vision_layers=2, vocab_size=1000, text_width=64, text_layers=1),
    ),
}

# Random weights need care to be useful (see the README): a gain above 1 keeps the greedy loop
# out of a fixed point; rows the tokenizer cannot spell and audio specials are shrunk so the
# text decodes to words and frames hold real codes. --likely-stop gives EOT and the stop
# layer's EOA rows of 0.3 the normal scale so answers end on their own after tens to hundreds of
# steps: both tokens sit in every prompt and tied embeddings make a random model copy its
# input, so at the normal scale they would win at once.
LINEAR_GAIN = 2.0
EMBED_STD = 1.0
UNUSED_ROW_SCALE = 0.05
BYTE_TOKENS = 256  # a byte-level BPE's first ids are single bytes, which alone may be half a character
STOP_ROW_SCALE = 0.3
CORPUS = [
    "What is your name?", "What are your hobbies?", "How are you feeling today?",
    "What is the weather like today?", "Can you tell me a joke?", "I like to read books about science and history.",
    "The quick brown fox jumps over the lazy dog.", "My name is Omni and I can listen and talk.",
    "It is sunny and warm, a good day for a walk in the park.", "Tea is made by pouring hot water over leaves.",
    "Time moves forward, and we measure it with clocks and calendars.", "Hello! Nice to meet you. How can I help?",
]


def build_config(preset: Preset, family: str) -> dict:
    vision = {"vision_adapter_dim": preset.clip.embed_dim} if family == "mini-omni2" else {}
    return {**OFFICIAL_YAML, **preset.lm, **vision}


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer like Qwen2's, trained on a few sentences."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tokenizer


def random_lm_state(config: ModelConfig, text_rows: int, likely_stop: bool) -> dict[str, torch.Tensor]:
    model = OmniLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_1.weight") or name.endswith("norm_2.weight") or name.endswith("ln_f.weight"):
                continue  # RMSNorm weights stay at 1
            if p.dim() == 1:
                p.normal_(0.0, 0.1)  # the QKV bias
            elif name == "transformer.wte.weight":
                p.normal_(0.0, EMBED_STD)
            else:
                p.normal_(0.0, LINEAR_GAIN / math.sqrt(p.size(1)))
        wte = model.transformer.wte.weight
        wte[:BYTE_TOKENS] *= UNUSED_ROW_SCALE
        wte[text_rows:PADDED_TEXT_VOCAB] *= UNUSED_ROW_SCALE
        for layer in range(N_AUDIO_LAYERS):
            wte[audio_id(AUDIO_CODES, layer):audio_id(PADDED_AUDIO_VOCAB, layer)] *= UNUSED_ROW_SCALE
        if likely_stop:
            for row in (EOT, audio_id(EOA, STOP_LAYER)):
                wte[row] = torch.randn(wte.size(1)) * STOP_ROW_SCALE * EMBED_STD
    state = model.state_dict()
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()  # stored separately, as released
    return state


def random_whisper(dims: WhisperDims) -> dict:
    """A state dict in openai-whisper's layout (encoder and decoder), fp16 as released."""
    encoder = WhisperEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    width, mlp = dims.n_text_state, dims.n_text_state * 4
    state["decoder.token_embedding.weight"] = torch.randn(dims.n_vocab, width) * 0.02
    state["decoder.positional_embedding"] = sinusoids(dims.n_text_ctx, width)
    for i in range(dims.n_text_layer):
        block = f"decoder.blocks.{i}."
        for attn in ("attn", "cross_attn"):
            for proj in ("query", "key", "value", "out"):
                state[f"{block}{attn}.{proj}.weight"] = torch.randn(width, width) / math.sqrt(width)
                if proj != "key":
                    state[f"{block}{attn}.{proj}.bias"] = torch.zeros(width)
        for ln in ("attn_ln", "cross_attn_ln", "mlp_ln"):
            state[f"{block}{ln}.weight"], state[f"{block}{ln}.bias"] = torch.ones(width), torch.zeros(width)
        state[f"{block}mlp.0.weight"], state[f"{block}mlp.0.bias"] = torch.randn(mlp, width) / math.sqrt(width), torch.zeros(mlp)
        state[f"{block}mlp.2.weight"], state[f"{block}mlp.2.bias"] = torch.randn(width, mlp) / math.sqrt(mlp), torch.zeros(width)
    state["decoder.ln.weight"], state["decoder.ln.bias"] = torch.ones(width), torch.zeros(width)
    return {"dims": asdict(dims), "model_state_dict": {k: v.half() for k, v in state.items()}}


def random_snac(config: dict) -> dict[str, torch.Tensor]:
    """SNAC weights with the legacy `weight_g`/`weight_v` keys of the hub's pytorch_model.bin."""
    state = snac_class()(**config).state_dict()
    legacy = {}
    for key, value in state.items():
        for new, old in zip(PARAM_NORM_KEYS, LEGACY_NORM_KEYS):
            if key.endswith(new):
                key = key[: -len(new)] + old
        legacy[key] = value
    return legacy


class RandomClip(nn.Module):
    """CLIP's parameter layout (image tower, text tower, logit scale) with random values."""

    def __init__(self, dims: ClipDims) -> None:
        super().__init__()
        grid = IMAGE_SIZE // dims.patch_size
        self.visual = VisionTower(dims.vision_width, dims.vision_layers, dims.patch_size, grid, dims.embed_dim)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*(ResidualBlock(dims.text_width) for _ in range(dims.text_layers)))
        self.token_embedding = nn.Embedding(dims.vocab_size, dims.text_width)
        self.positional_embedding = nn.Parameter(torch.randn(dims.context_length, dims.text_width) * 0.01)
        self.ln_final = nn.LayerNorm(dims.text_width)
        self.text_projection = nn.Parameter(torch.randn(dims.text_width, dims.embed_dim) / math.sqrt(dims.text_width))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(("ln_pre.weight", "ln_post.weight", "ln_1.weight", "ln_2.weight", "ln_final.weight")):
                    p.normal_(1.0, 0.1)
                elif p.dim() == 1 and name != "logit_scale":
                    p.normal_(0.0, 0.1)  # biases, LayerNorm shifts, the class embedding
                elif p.dim() > 1 and name != "positional_embedding" and name != "text_projection":
                    p.normal_(0.0, 1 / math.sqrt(p[0].numel()))
            self.visual.positional_embedding.normal_(0.0, dims.vision_width ** -0.5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


def save_random_clip(dims: ClipDims, path: Path) -> None:
    """A TorchScript archive like OpenAI's ViT-B-32.pt: layers and projections stored in fp16, the
    LayerNorms and embeddings in fp32."""
    model = RandomClip(dims).eval()
    with torch.no_grad(), warnings.catch_warnings():  # TorchScript is deprecated; OpenAI's file is one
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        archive = torch.jit.trace(model, torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
        rounded = fp16_valued(model)
        for name, p in archive.named_parameters():
            if name in rounded:
                p.data = p.data.half()
        torch.jit.save(archive, str(path))


def make_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, likely_stop: bool = False,
                    family: str = "mini-omni") -> Path:
    """Write every file of a checkpoint directory; returns its path."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if family not in HUB_REPOS:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(HUB_REPOS)}")
    spec = PRESETS[preset]
    out = Path(out_dir)
    (out / SNAC_DIR).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    raw_config = build_config(spec, family)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(raw_config, sort_keys=False))
    tokenizer = train_tokenizer(spec.tokenizer_vocab)
    tokenizer.save(str(out / TOKENIZER_FILE))
    (out / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "tokenizer_class": "Qwen2Tokenizer"}))
    text_rows = min(tokenizer.get_vocab_size(), TEXT_VOCAB)
    torch.save(random_lm_state(ModelConfig.from_dict(raw_config), text_rows, likely_stop), out / WEIGHTS_FILE)
    torch.save(random_whisper(spec.whisper), out / WHISPER_FILE)
    (out / SNAC_DIR / SNAC_CONFIG).write_text(json.dumps(spec.snac, indent=2))
    torch.save(random_snac(spec.snac), out / SNAC_DIR / SNAC_WEIGHTS)
    if family == "mini-omni2":
        save_random_clip(spec.clip, out / CLIP_FILE)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to create (or overwrite files in)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="tiny for tests, full for real sizes")
    parser.add_argument("--family", choices=sorted(HUB_REPOS), default="mini-omni",
                        help="mini-omni2 adds the vision adapter and a CLIP image tower")
    parser.add_argument("--seed", type=int, default=0, help="random seed for every weight")
    parser.add_argument("--likely-stop", action="store_true", help="make text EOT and audio EOA likely, so answers end early")
    args = parser.parse_args(argv)
    out = make_checkpoint(args.out_dir, args.preset, args.seed, args.likely_stop, args.family)
    print(f"wrote a {args.preset} {args.family} checkpoint to {out}")


if __name__ == "__main__":
    main()
