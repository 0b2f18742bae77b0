"""Small HF-format models and tokenizers made locally (no model hub is reachable here).

``make_tiny_model(out_dir, preset="tiny")`` writes a directory that loads in transformers and
serves in vLLM (CPU or CUDA): config.json, model.safetensors, tokenizer.json,
tokenizer_config.json (with a chat template), special_tokens_map.json, generation_config.json.

Invariants:
- The tokenizer is character-level over printable ASCII plus chat specials, padded with
  reserved tokens so that its size equals ``config.vocab_size`` (vLLM samples any id in the
  vocab; every id must decode). ``decode(encode(text)) == text`` for printable ASCII text.
- Attention head_dim is always in vLLM-CPU's supported set (checked here, not at first request).
- Same preset + seed => bit-identical weights.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from asyncrl.errors import ConfigError

__all__ = ["PRESETS", "ModelPreset", "build_tokenizer", "check_model_dir", "make_tiny_model"]

VLLM_CPU_HEAD_DIMS = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})

IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = (EOS, IM_START, IM_END)
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelPreset:
    """Qwen2 dimensions for a locally made model."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, ModelPreset] = {
    # ~0.8M parameters: unit and integration tests.
    "tiny": ModelPreset(128, 4, 2, 1, 384, 128),
    # ~3.5M parameters: mid-size benchmarks.
    "small": ModelPreset(256, 4, 4, 2, 1024, 256),
    # Qwen2-0.5B dimensions (494M parameters), random init: hotload benchmarks.
    "qwen2-0.5b-shape": ModelPreset(896, 24, 14, 2, 4864, 151936, 32768),
}


def _check_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    if preset.hidden_size % preset.num_attention_heads:
        raise ConfigError(f"preset {name!r}: hidden_size not divisible by heads")
    if preset.head_dim not in VLLM_CPU_HEAD_DIMS:
        raise ConfigError(
            f"preset {name!r}: head_dim={preset.head_dim} is not supported by vLLM-CPU "
            f"(supported: {sorted(VLLM_CPU_HEAD_DIMS)})"
        )
    return preset


def _vocab(vocab_size: int) -> dict[str, int]:
    base = [*SPECIAL_TOKENS, *CHARS]
    if vocab_size < len(base):
        raise ConfigError(f"vocab_size must be >= {len(base)}, got {vocab_size}")
    names = base + [f"<|reserved_{i}|>" for i in range(vocab_size - len(base))]
    return {tok: i for i, tok in enumerate(names)}


def build_tokenizer(vocab_size: int = 128) -> Any:
    """A character-level ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=_vocab(vocab_size), unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    out_dir: str | Path, *, preset: str = "tiny", seed: int = 0, dtype: str = "bfloat16"
) -> Path:
    """Write a randomly initialised Qwen2-architecture HF model directory and return its path."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    spec = _check_preset(preset)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)
    fields: dict[str, Any] = {
        **asdict(spec),
        "head_dim": spec.head_dim,
        "bos_token_id": tokenizer.convert_tokens_to_ids(IM_START),
        "eos_token_id": tokenizer.convert_tokens_to_ids(IM_END),
        "pad_token_id": tokenizer.pad_token_id,
        "rope_theta": 10000.0,
        "dtype": dtype,
    }
    config = Qwen2Config(**fields)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in (IM_END, EOS)]
    GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id).save_pretrained(
        out
    )
    tokenizer.save_pretrained(out)
    _write_json(out / "asyncrl_model.json", {"preset": preset, "seed": seed, "dtype": dtype})
    return out


# any one of these is a usable tokenizer (fast tokenizer, sentencepiece, or BPE vocab + merges)
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


def check_model_dir(model_dir: str | Path, *, tokenizer: bool = True) -> Path:
    """Raise ConfigError naming everything an HF model directory lacks to be trained and served.

    Checked: the directory exists; ``config.json`` is a JSON object; safetensors weights exist
    (a ``model.safetensors.index.json`` must name shards that all exist); and, with
    ``tokenizer``, one of :data:`TOKENIZER_FILES`. Pickled ``*.bin`` weights are not accepted:
    loading them runs arbitrary code."""
    path = Path(model_dir)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ConfigError(f"model directory {path} {what}")
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    missing += _missing_weights(path)
    if tokenizer and not any(all((path / f).is_file() for f in fs) for fs in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json, tokenizer.model or vocab.json + merges.txt)")
    if missing:
        raise ConfigError(f"model directory {path} is missing {', '.join(missing)}")
    _check_json_object(path / "config.json")
    return path


def _missing_weights(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _check_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{index} has no 'weight_map' object naming the weight shards")
        shards = sorted(set(map(str, weight_map.values())))
        absent = [s for s in shards if not (path / s).is_file()]
        return [f"weight shard {s} (named in {index.name})" for s in absent]
    if any(path.glob("*.safetensors")):
        return []
    pickled = sorted(p.name for p in path.glob("*.bin"))
    if pickled:
        return [f"model.safetensors (found only pickled weights {pickled}; convert them to "
                "safetensors: asyncrl never loads pickles)"]
    return ["model.safetensors"]


def _check_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
