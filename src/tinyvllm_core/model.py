from __future__ import annotations

from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType

from .config import ModelConfig
from .formats.rope import rope_frequencies
from .kernels.attention import paged_attention, write_kv
from .kernels.linear import gather_rows, linear


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
  xf = x.float()
  normed = xf * (xf.square().mean(-1, keepdim=True) + eps).rsqrt()
  return (normed.cast(x.dtype) * weight).contiguous()  # not re-done per matmul output


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
  x1, x2 = x.chunk(2, dim=-1)
  return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)


def _matrix(w: dict[str, Tensor], name: str) -> list[Tensor]:
  """A weight, then its scales and offsets if quantized: the arguments of linear and gather_rows."""
  return [w[name], *(w[n] for n in (name + "_scale", name + "_min") if n in w)]


class Model:
  """Llama / Qwen2 / Qwen3 decoder over a flat batch of tokens with a paged KV cache.
  Every token row carries its own block table row and context length, so prefill chunks and decode
  tokens of many sequences run in one forward pass. The runner jits embed, one layer (reused for
  every layer with that layer's weights and pools as inputs) and head separately."""

  def __init__(self, config: ModelConfig, weights: dict[str, Tensor], num_blocks: int, block_size: int, dtype: DType):
    self.config, self.weights, self.dtype = config, weights, dtype
    inv_freq, self.rope_scale = rope_frequencies(config)
    self.inv_freq = Tensor(inv_freq, dtype=dtypes.float32).realize()
    kv_width = config.num_kv_heads * config.head_dim
    self.layer_inputs = []  # what the layer jit gets for layer i; K is transposed per block (paged_qk)
    for _ in range(config.num_layers):
      k_pool = Tensor.zeros(num_blocks, kv_width, block_size, dtype=dtype).contiguous().realize()
      v_pool = (
        Tensor.zeros(num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype=dtype).contiguous().realize()
      )
      window = Tensor([config.window(len(self.layer_inputs)) or 2**30], dtype=dtypes.int32).realize()
      self.layer_inputs.append({"k_pool": k_pool, "v_pool": v_pool, "window": window})
    for name, w in weights.items():
      if name.startswith("layers."):
        _, i, key = name.split(".")
        self.layer_inputs[int(i)][key] = w

  def embed(self, token_ids: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> the token rows and the RoPE cos/sin tables of their positions (computed once per step, read by every
    layer)."""
    freqs = positions.float().reshape(-1, 1, 1) * self.inv_freq.reshape(1, 1, -1)
    table, *scale = _matrix(self.weights, "embed")
    x = gather_rows(table, token_ids, *scale, dtype=self.dtype)
    return x, freqs.cos() * self.rope_scale, freqs.sin() * self.rope_scale

  def layer(self, x: Tensor, k_pool: Tensor, v_pool: Tensor, **inputs: Tensor) -> Tensor:
    """inputs: the step's cos, sin, block_tables, context_lens and slot_mapping, and the layer's weights."""
    x = x + self.attention(x, k_pool, v_pool, inputs)
    return x + self.mlp(x, inputs)

  def attention(self, x: Tensor, k_pool: Tensor, v_pool: Tensor, w: dict[str, Tensor]) -> Tensor:
    c, N = self.config, x.shape[0]
    qkv = linear(rms_norm(x, w["attn_norm"], c.rms_norm_eps), *_matrix(w, "qkv"))
    if c.qkv_bias:
      qkv = qkv + w["qkv_bias"]
    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    q = qkv[:, :q_size].reshape(N, c.num_heads, c.head_dim)
    k = qkv[:, q_size : q_size + kv_size].reshape(N, c.num_kv_heads, c.head_dim)
    v = qkv[:, q_size + kv_size :]
    if c.qk_norm:
      q, k = rms_norm(q, w["q_norm"], c.rms_norm_eps), rms_norm(k, w["k_norm"], c.rms_norm_eps)
    q, k = rope(q, w["cos"], w["sin"]), rope(k, w["cos"], w["sin"]).reshape(N, kv_size)
    k_pool, v_pool = write_kv(k_pool, v_pool, k, v, w["slot_mapping"])
    attn = paged_attention(q, k_pool, v_pool, w["block_tables"], w["context_lens"], w["window"]).cast(x.dtype)
    return linear(attn.reshape(N, q_size), *_matrix(w, "o"))

  def mlp(self, x: Tensor, w: dict[str, Tensor]) -> Tensor:
    gate, up = linear(rms_norm(x, w["mlp_norm"], self.config.rms_norm_eps), *_matrix(w, "gate_up")).chunk(2, dim=-1)
    return linear((gate.silu() * up).contiguous(), *_matrix(w, "down"))

  def head(self, x: Tensor, logits_indices: Tensor) -> Tensor:
    """-> float32 logits [len(logits_indices), vocab] of the selected token rows."""
    x = rms_norm(gather_rows(x, logits_indices), self.weights["norm"], self.config.rms_norm_eps)
    return linear(x, *_matrix(self.weights, "lm_head")).float()
