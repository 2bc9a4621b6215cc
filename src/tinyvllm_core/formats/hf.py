"""Hugging Face checkpoints: config.json, safetensors weights (sharded or not), tokenizer.json, chat template."""

import json
from pathlib import Path

from tinygrad import Tensor

from ..config import ConfigError, ModelConfig
from ..kernels.devices import tensor_device
from .rope import rope_from_hf

# HF `architectures` entry -> our model family
SUPPORTED_ARCHITECTURES = {
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "llama",
  "Qwen2ForCausalLM": "qwen2",
  "Qwen3ForCausalLM": "qwen3",
}
HF_NAMES = {
  "embed": "embed_tokens.weight",
  "norm": "norm.weight",
  "lm_head": "lm_head.weight",
  **{k: f"layers.{{i}}.self_attn.{k}_proj.weight" for k in "qkvo"},
  **{f"{k}_bias": f"layers.{{i}}.self_attn.{k}_proj.bias" for k in "qkv"},
  **{k: f"layers.{{i}}.self_attn.{k}.weight" for k in ("q_norm", "k_norm")},
  **{k: f"layers.{{i}}.mlp.{k}_proj.weight" for k in ("gate", "up", "down")},
  "attn_norm": "layers.{i}.input_layernorm.weight",
  "mlp_norm": "layers.{i}.post_attention_layernorm.weight",
}
SAFETENSORS_DTYPES = ("F32", "F16", "BF16")


def read_json(path: Path) -> dict:
  """A JSON file's object, {} when the file does not exist."""
  if not path.exists():
    return {}
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from None


def model_config(path: Path) -> ModelConfig:
  """ModelConfig from a config.json."""
  if not path.exists():
    raise ConfigError(f"{path}: not found; a model directory needs config.json")
  cfg = read_json(path)
  archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
  family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
  if family is None:
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    raise ConfigError(f"{path}: architecture {archs[0]!r} is not supported (supported: {supported})")

  def need(key: str):
    if key not in cfg:
      raise ConfigError(f"{path}: field {key!r} is missing")
    return cfg[key]

  heads, hidden = need("num_attention_heads"), need("hidden_size")
  _check_arithmetic(cfg, family, path)
  rope_theta, rope_scaling = rope_from_hf(cfg, path)
  sliding_window, max_window_layers = _sliding_window(cfg, family, path)
  return ModelConfig(
    family=family,
    vocab_size=need("vocab_size"),
    hidden_size=hidden,
    intermediate_size=need("intermediate_size"),
    num_layers=need("num_hidden_layers"),
    num_heads=heads,
    num_kv_heads=cfg.get("num_key_value_heads") or heads,
    head_dim=cfg.get("head_dim") or hidden // heads,
    rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
    rope_theta=rope_theta,
    max_position_embeddings=cfg.get("max_position_embeddings", 2048),
    tie_word_embeddings=cfg.get("tie_word_embeddings", False),
    rope_scaling=rope_scaling,
    sliding_window=sliding_window,
    max_window_layers=max_window_layers,
  )


def _check_arithmetic(cfg: dict, family: str, path: Path) -> None:
  """Fields that would change the arithmetic in a way the model does not implement are errors, not defaults."""
  if cfg.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
  if family != "qwen2" and cfg.get("attention_bias"):
    raise ConfigError(f"{path}: attention_bias true is not supported for {family}")
  if cfg.get("mlp_bias"):
    raise ConfigError(f"{path}: mlp_bias true is not supported")


def _sliding_window(cfg: dict, family: str, path: Path) -> tuple[int | None, int]:
  """(window, first layer that uses it): Mistral's sliding_window on every layer; Qwen2/3's when use_sliding_window,
  from max_window_layers on (or as layer_types lists them)."""
  window = cfg.get("sliding_window")
  if family != "llama" and not cfg.get("use_sliding_window"):
    window = None
  if window is None:
    return None, 0
  first = cfg.get("max_window_layers", 0) if family != "llama" else 0
  if layer_types := cfg.get("layer_types"):
    sliding = [kind == "sliding_attention" for kind in layer_types]
    first = sliding.index(True) if True in sliding else len(sliding)
    if not all(sliding[first:]):
      raise ConfigError(f"{path}: layer_types interleaves sliding and full attention, which is not supported")
  return window, first


def read_safetensors(path: Path, device: str) -> dict[str, Tensor]:
  """The tensors of a .safetensors file, memory-mapped (tinygrad's safe_load on its DISK device) and moved lazily to
  `device`: each is read and cast once on its way to the engine, with no float32 host copy."""
  from tinygrad.nn.state import safe_dtypes, safe_load, safe_load_metadata

  try:
    file, data_start, header = safe_load_metadata(Tensor(path))
  except Exception as e:
    raise ConfigError(f"{path}: not a valid safetensors file ({e})") from None
  size = path.stat().st_size
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info.get("dtype") not in SAFETENSORS_DTYPES or info["dtype"] not in safe_dtypes:
      raise ConfigError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    if data_start + info["data_offsets"][1] > size:
      raise ConfigError(f"{path}: truncated (tensor {name!r} ends past the end of the file); download it again")
  return {name: t.to(tensor_device(device)) for name, t in safe_load(file).items()}


def read_weights(model_dir: Path, device: str) -> dict[str, Tensor]:
  """Every tensor of the checkpoint's safetensors files (the shards an index lists, else every *.safetensors)."""
  index = model_dir / "model.safetensors.index.json"
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  else:
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
  if not files:
    raise ConfigError(f"{model_dir}: no *.safetensors weights found")
  if missing := next((f for f in files if not (model_dir / f).exists()), None):
    raise ConfigError(f"{model_dir / missing}: missing weight shard listed in model.safetensors.index.json")
  return {k.removeprefix("model."): v for f in files for k, v in read_safetensors(model_dir / f, device).items()}


def read_tokenizer(model_dir: Path):
  from tokenizers import Tokenizer

  path = model_dir / "tokenizer.json"
  if not path.exists():
    raise ConfigError(f"{model_dir}: tokenizer.json is missing")
  try:
    return Tokenizer.from_file(str(path))
  except Exception as e:
    raise ConfigError(f"{path}: cannot be read ({e})") from None


def chat_template(model_dir: Path, tokenizer_config: dict) -> str | None:
  template = tokenizer_config.get("chat_template")
  if isinstance(template, list):
    template = next((t["template"] for t in template if t.get("name") == "default"), None)
  if template is None and (model_dir / "chat_template.jinja").exists():
    template = (model_dir / "chat_template.jinja").read_text()
  return template


def special_tokens(tokenizer_config: dict) -> dict[str, str]:
  """bos_token / eos_token strings for chat templates."""
  out = {}
  for key in ("bos_token", "eos_token"):
    token = tokenizer_config.get(key)
    content = token.get("content") if isinstance(token, dict) else token
    if content:
      out[key] = content
  return out


def eos_token_ids(generation_config: dict, config: dict) -> list[int]:
  eos = generation_config.get("eos_token_id", config.get("eos_token_id"))
  return [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
