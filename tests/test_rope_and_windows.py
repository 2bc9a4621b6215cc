"""RoPE scaling (llama3, linear, yarn) read from config.json in both layouts, and sliding-window attention, against
the NumPy reference over prompts longer than the window and than original_max_position_embeddings."""

import json

import numpy as np
import pytest
from model_factory import load_numpy_weights, make_checkpoint
from numpy_ref import reference_logits
from test_model_logits import _engine_logits
from tinyvllm_core import ConfigError, LLMEngine

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
YARN = {"rope_type": "yarn", "factor": 4.0}
LINEAR = {"rope_type": "linear", "factor": 2.0}


def transformers4(scaling: dict, theta: float) -> dict:
  return {"rope_theta": theta, "rope_scaling": scaling | {"original_max_position_embeddings": 16}}


def transformers5(scaling: dict, theta: float) -> dict:
  parameters = {"rope_theta": theta, **scaling, "original_max_position_embeddings": 16}
  return {"rope_theta": None, "rope_scaling": None, "rope_parameters": parameters}


VARIANTS = {
  "llama3-t4": ("llama", transformers4(LLAMA3, 500000.0)),
  "llama3-t5": ("llama", transformers5(LLAMA3, 500000.0)),
  "yarn-qwen3-t4": ("qwen3", transformers4(YARN, 1000000.0)),
  "yarn-qwen3-t5": ("qwen3", transformers5(YARN, 1000000.0)),
  "linear-t4": ("llama", transformers4(LINEAR, 10000.0)),
  "t5-theta-only": ("qwen3", {"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
  "mistral-window": ("llama", {"architectures": ["MistralForCausalLM"], "sliding_window": 5}),
  "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
}
PROMPT = [(i * 37) % 250 + 3 for i in range(40)]  # longer than the windows and than original_max_position_embeddings


def without(config: dict, name: str) -> dict:
  """The same config with the feature under test taken away: what an engine that ignored it would compute."""
  if "window" in name:
    return config | {"sliding_window": None}
  stripped = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_parameters")}
  return stripped | {"rope_theta": 10000.0}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_reference(tmp_path, device, name):
  family, overrides = VARIANTS[name]
  path = make_checkpoint(tmp_path / name, family=family, qk_gain=3.0, config_overrides=overrides)
  weights, config = load_numpy_weights(path), json.loads((path / "config.json").read_text())
  _, got, tokens = _engine_logits(path, PROMPT, num_decode=3, device=device, dtype="float32")
  ref = reference_logits(weights, config, tokens[:-1])[len(PROMPT) - 1 :]
  tolerance = 1e-4 * np.abs(ref).max()
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=tolerance)
  ignored = reference_logits(weights, without(config, name), tokens[:-1])[len(PROMPT) - 1 :]
  assert np.abs(ignored - ref).max() > 20 * tolerance  # sharp enough: ignoring the feature would fail


@pytest.mark.parametrize(
  "overrides,field",
  [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "mystery": 1}}, "'mystery'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
  ],
)
def test_unimplemented_fields_are_one_line_errors(tmp_path, overrides, field):
  path = make_checkpoint(tmp_path / "m", family="llama", config_overrides=overrides)
  with pytest.raises(ConfigError, match=field) as e:
    LLMEngine(path, device="CPU", num_blocks=16)
  assert "\n" not in str(e.value) and "config.json" in str(e.value)


@pytest.mark.parametrize("name", ["llama3-t4", "yarn-qwen3-t5", "linear-t4"])
def test_gguf_rope_scaling_matches_reference(tmp_path, device, name):
  """GGUF carries llama3 scaling as the rope_freqs.weight divisors and linear / yarn as rope.scaling.* metadata."""
  from gguf_writer import write_gguf

  family, overrides = VARIANTS[name]
  path = make_checkpoint(tmp_path / name, family=family, qk_gain=3.0, config_overrides=overrides)
  config = json.loads((path / "config.json").read_text())
  weights = write_gguf(tmp_path / "m.gguf", path, "F32")
  _, got, tokens = _engine_logits(tmp_path / "m.gguf", PROMPT, num_decode=2, device=device, dtype="float32")
  ref = reference_logits(weights, config, tokens[:-1])[len(PROMPT) - 1 :]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
