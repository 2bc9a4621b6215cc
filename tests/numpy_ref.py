"""Independent NumPy reference forward pass for llama / qwen2 / qwen3 (float64 internally)."""

from __future__ import annotations
import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
  """x: [T, n_heads, D], HF rotate_half layout."""
  d = x.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
  freqs = positions[:, None].astype(np.float64) * inv_freq[None, :]
  emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
  x1, x2 = x[..., : d // 2], x[..., d // 2 :]
  return x * np.cos(emb) + np.concatenate([-x2, x1], axis=-1) * np.sin(emb)


def reference_logits(weights: dict, config: dict, token_ids: list[int]) -> np.ndarray:
  W = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
  H, nh = config["hidden_size"], config["num_attention_heads"]
  nkv = config.get("num_key_value_heads") or nh
  D = config.get("head_dim") or H // nh
  eps, theta = config["rms_norm_eps"], config.get("rope_theta", 10000.0)
  T, pos = len(token_ids), np.arange(len(token_ids))
  mask = np.triu(np.full((T, T), -np.inf), k=1)
  x = W["model.embed_tokens.weight"][np.asarray(token_ids)]
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
    q, k, v = (h @ W[p + f"self_attn.{n}_proj.weight"].T + W.get(p + f"self_attn.{n}_proj.bias", 0.0) for n in "qkv")
    q, k, v = q.reshape(T, nh, D), k.reshape(T, nkv, D), v.reshape(T, nkv, D)
    if p + "self_attn.q_norm.weight" in W:
      q, k = rms_norm(q, W[p + "self_attn.q_norm.weight"], eps), rms_norm(k, W[p + "self_attn.k_norm.weight"], eps)
    q, k = rope(q, pos, theta), rope(k, pos, theta)
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
