"""Independent NumPy reference forward pass for llama / qwen2 / qwen3 (float64 internally)."""

from __future__ import annotations
import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_parameters(config: dict) -> dict:
  """transformers 5's rope_parameters, or transformers 4's top-level rope_theta + rope_scaling, as one dict."""
  if config.get("rope_parameters"):
    return dict(config["rope_parameters"])
  scaling = dict(config.get("rope_scaling") or {})
  scaling.setdefault("rope_type", scaling.pop("type", "default"))
  return {"rope_theta": config.get("rope_theta", 10000.0), **scaling}


def inv_frequencies(config: dict, d: int) -> tuple[np.ndarray, float]:
  """Per-dimension inverse frequencies with HF's scaling (written out dimension by dimension), and yarn's cos/sin
  factor."""
  p = rope_parameters(config)
  base, kind, factor = p["rope_theta"], p.get("rope_type", "default"), p.get("factor", 1.0)
  original = p.get("original_max_position_embeddings") or config.get("max_position_embeddings")
  out, scale = [], 1.0
  for i in range(d // 2):
    f = base ** (-2 * i / d)
    if kind == "linear":
      f = f / factor
    elif kind == "llama3":
      wavelength = 2 * np.pi / f
      low, high = p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
      if wavelength > original / low:
        f = f / factor
      elif wavelength >= original / high:
        t = (original / wavelength - low) / (high - low)
        f = (1 - t) * f / factor + t * f
    elif kind == "yarn":

      def dim_of(rotations):
        return d * np.log(original / (rotations * 2 * np.pi)) / (2 * np.log(base))

      lo = max(np.floor(dim_of(p.get("beta_fast", 32.0))), 0)
      hi = min(np.ceil(dim_of(p.get("beta_slow", 1.0))), d - 1)
      keep = 1 - min(max((i - lo) / max(hi - lo, 0.001), 0.0), 1.0)  # 1: extrapolate (keep), 0: interpolate
      f = f / factor * (1 - keep) + f * keep
      scale = p.get("attention_factor") or (0.1 * np.log(factor) + 1.0 if factor > 1 else 1.0)
    out.append(f)
  return np.array(out), scale


def rope(x: np.ndarray, positions: np.ndarray, config: dict) -> np.ndarray:
  """x: [T, n_heads, D], HF rotate_half layout."""
  d = x.shape[-1]
  inv_freq, scale = inv_frequencies(config, d)
  freqs = positions[:, None].astype(np.float64) * inv_freq[None, :]
  emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
  x1, x2 = x[..., : d // 2], x[..., d // 2 :]
  return (x * np.cos(emb) + np.concatenate([-x2, x1], axis=-1) * np.sin(emb)) * scale


def sliding_window(config: dict, layer: int) -> int | None:
  """Mistral: every layer; Qwen2/3: when use_sliding_window, from max_window_layers on."""
  if config["architectures"][0] == "MistralForCausalLM":
    return config.get("sliding_window")
  if config.get("use_sliding_window") and layer >= config.get("max_window_layers", 0):
    return config.get("sliding_window")
  return None


def reference_logits(weights: dict, config: dict, token_ids: list[int]) -> np.ndarray:
  W = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
  H, nh = config["hidden_size"], config["num_attention_heads"]
  nkv = config.get("num_key_value_heads") or nh
  D = config.get("head_dim") or H // nh
  eps = config["rms_norm_eps"]
  T, pos = len(token_ids), np.arange(len(token_ids))
  causal = np.triu(np.full((T, T), -np.inf), k=1)
  x = W["model.embed_tokens.weight"][np.asarray(token_ids)]
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
    q, k, v = (h @ W[p + f"self_attn.{n}_proj.weight"].T + W.get(p + f"self_attn.{n}_proj.bias", 0.0) for n in "qkv")
    q, k, v = q.reshape(T, nh, D), k.reshape(T, nkv, D), v.reshape(T, nkv, D)
    if p + "self_attn.q_norm.weight" in W:
      q, k = rms_norm(q, W[p + "self_attn.q_norm.weight"], eps), rms_norm(k, W[p + "self_attn.k_norm.weight"], eps)
    q, k = rope(q, pos, config), rope(k, pos, config)
    window = sliding_window(config, i)
    too_old = pos[:, None] - pos[None, :] >= window if window else np.zeros((T, T), bool)
    mask = np.where(too_old, -np.inf, causal)
    k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + mask
    s = np.exp(s - s.max(-1, keepdims=True))
    attn = np.einsum("hts,shd->thd", s / s.sum(-1, keepdims=True), v).reshape(T, nh * D)
    x = x + attn @ W[p + "self_attn.o_proj.weight"].T
    h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
    g = h @ W[p + "mlp.gate_proj.weight"].T
    x = x + (g / (1.0 + np.exp(-g)) * (h @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
  x = rms_norm(x, W["model.norm.weight"], eps)
  head = W["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else W["lm_head.weight"]
  return (x @ head.T).astype(np.float32)


def reference_greedy(weights: dict, config: dict, prompt_ids: list[int], max_tokens: int) -> list[int]:
  ids, out = list(prompt_ids), []
  for _ in range(max_tokens):
    out.append(int(np.argmax(reference_logits(weights, config, ids)[-1])))
    ids.append(out[-1])
  return out
