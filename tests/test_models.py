from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncrl.errors import ConfigError
from asyncrl.models import PRESETS, VLLM_CPU_HEAD_DIMS, build_tokenizer, make_tiny_model


def test_tiny_model_dir_has_hf_files(tiny_model_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_model_dir / name).exists(), name
    tok_cfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    chat = tok_cfg.get("chat_template") or (tiny_model_dir / "chat_template.jinja").read_text()
    assert "<|im_start|>" in chat


def test_tiny_model_loads_in_transformers_and_generates(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n_params < 1.5e6
    assert len(tok) == model.config.vocab_size
    ids = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True)
    ids = list(getattr(ids, "input_ids", ids))
    out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] == len(ids) + 5 or int(out[0, -1]) in (tok.eos_token_id, 2)


@pytest.mark.parametrize("text", ["hello, World! 123", "a\nb  c", "{}[]()<>?/\\|~`'\""])
def test_tokenizer_round_trips_text(text: str) -> None:
    tok = build_tokenizer(128)
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_tokenizer_covers_whole_vocab() -> None:
    tok = build_tokenizer(300)
    assert len(tok) == 300
    assert all(tok.decode([i]) for i in range(300))


def test_chat_template_renders_messages() -> None:
    tok = build_tokenizer(128)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>"


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    a = load_file(make_tiny_model(tmp_path / "a", seed=1) / "model.safetensors")
    b = load_file(make_tiny_model(tmp_path / "b", seed=1) / "model.safetensors")
    c = load_file(make_tiny_model(tmp_path / "c", seed=2) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)
    assert any(not a[k].equal(c[k]) for k in a)


def test_presets_have_vllm_cpu_head_dims() -> None:
    for name, preset in PRESETS.items():
        assert preset.head_dim in VLLM_CPU_HEAD_DIMS, name
    big = PRESETS["qwen2-0.5b-shape"]
    assert (big.hidden_size, big.num_hidden_layers, big.intermediate_size) == (896, 24, 4864)


def test_bad_preset_and_dtype_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        make_tiny_model(tmp_path, preset="huge")
    with pytest.raises(ConfigError, match="dtype"):
        make_tiny_model(tmp_path, dtype="int8")


def test_cli_make_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from asyncrl.cli import app

    result = CliRunner().invoke(app, ["make-model", str(tmp_path / "m"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.safetensors").exists()
    bad = CliRunner().invoke(app, ["make-model", str(tmp_path / "x"), "--preset", "nope"])
    assert bad.exit_code != 0
    assert "unknown model preset" in bad.output
