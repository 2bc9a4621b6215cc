"""Checkpoint tensors -> the engine's weights: our names, q/k/v and gate/up fused, then device tensors in the layout
the kernels read (float [N, K], CPU panels, int8 codes or GGUF blocks with their scales). The one place weights are
prepared."""

import contextlib
import mmap
from pathlib import Path

import numpy as np
from tinygrad import Device, Tensor
from tinygrad.dtype import DType

from ..config import ConfigError, ModelConfig
from ..kernels import int_dot
from ..kernels.linear import PANEL, QBLOCK, quantize_int8, to_panels
from .gguf_blocks import block_elements, dequantize, fuse_blocks, is_blocks, unpack_blocks

MATMUL_WEIGHTS = ("qkv", "o", "gate_up", "down", "lm_head", "embed")  # panels on CPU (gather_rows reads embed's too)


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  H, I = cfg.hidden_size, cfg.intermediate_size
  q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {
    "embed": (cfg.vocab_size, H),
    "lm_head": (cfg.vocab_size, H),
    "q": (q_rows, H),
    "k": (kv_rows, H),
    "v": (kv_rows, H),
    "o": (H, q_rows),
    "gate": (I, H),
    "up": (I, H),
    "down": (H, I),
  }


def _concat(*parts: np.ndarray | Tensor) -> np.ndarray | Tensor:
  """Fused rows. Parts with different GGUF block types are unpacked to one layout (int8 codes, scales, offsets);
  blocks fused with floats are dequantized."""
  if isinstance(parts[0], Tensor):
    return parts[0].cat(*parts[1:])
  if len({p.dtype for p in parts}) == 1:
    return np.concatenate(parts)
  if all(map(is_blocks, parts)):
    return fuse_blocks(list(parts))
  return np.concatenate([dequantize(p) for p in parts])


def canonical_weights(cfg: ModelConfig, sd: dict[str, np.ndarray], names: dict[str, str], source: Path) -> dict:
  """Our names for a checkpoint's tensors, q/k/v and gate/up fused; `names` maps our names to the checkpoint's ({i} =
  layer). A tied lm_head is the embed array itself."""
  shapes = _expected_shapes(cfg)

  def get(key: str, i: int = 0) -> np.ndarray:
    name = names[key].format(i=i)
    if name not in sd:
      raise ConfigError(f"{source}: tensor {name!r} is missing from the checkpoint")
    shape = sd[name].shape
    if is_blocks(sd[name]):  # GGUF blocks of 32 or 256 weights
      shape = (*shape[:-1], shape[-1] * block_elements(sd[name]))
    if key in shapes and shape != shapes[key]:
      raise ConfigError(
        f"{source}: tensor {name!r} has shape {shape}, the config says {shapes[key]}; config and weights do not match"
      )
    return sd[name]

  w = {"embed": get("embed"), "norm": get("norm")}
  tied = cfg.tie_word_embeddings or names["lm_head"] not in sd
  w["lm_head"] = w["embed"] if tied else get("lm_head")
  for i in range(cfg.num_layers):
    p = f"layers.{i}."
    w[p + "qkv"] = _concat(get("q", i), get("k", i), get("v", i))
    w[p + "gate_up"] = _concat(get("gate", i), get("up", i))
    for key in ("o", "down", "attn_norm", "mlp_norm"):
      w[p + key] = get(key, i)
    if cfg.qkv_bias:
      w[p + "qkv_bias"] = _concat(get("q_bias", i), get("k_bias", i), get("v_bias", i))
    if cfg.qk_norm:
      w[p + "q_norm"], w[p + "k_norm"] = get("q_norm", i), get("k_norm", i)
  return w


def resolve_quantize(quantize: str | None, host: dict, source) -> str | None:
  """auto: keep a GGUF file's blocks when it has some; gguf without blocks is an error naming the model."""
  has_blocks = any(map(is_blocks, host.values()))
  if quantize == "auto":
    return "gguf" if has_blocks else None
  if quantize == "gguf" and not has_blocks:
    name = source or "this model"
    raise ConfigError(f"{name} has no GGUF Q8_0/Q4_0/Q4_1 weights to keep (nor Q5_x, Q4_K-Q6_K); use int8 or none")
  return quantize


def prepare_weights(
  host: dict[str, np.ndarray | Tensor], dtype: DType, quantize: str | None, panels: bool
) -> dict[str, Tensor]:
  """Device tensors for every weight: `name`, and `name_scale` / `name_min` for quantized matrices. With panels (CPU,
  or quantized weights anywhere) the matrices are [N/8, K, 8] panels. A tied lm_head shares embed's tensors. Empties
  `host` as it goes."""
  tied = host["lm_head"] is host["embed"]
  out: dict[str, Tensor] = {}
  for name in list(host):
    w = host.pop(name)  # the host copy (or a device copy of a file's tensor) goes as soon as the weight is prepared
    if not (tied and name == "lm_head"):
      out |= _prepare(name, w, dtype, quantize, panels)
      _release_load_memory(Device.DEFAULT)
  if tied:
    out |= {k.replace("embed", "lm_head"): v for k, v in out.items() if k.startswith("embed")}
  return out


def _release_load_memory(device: str) -> None:
  """What loading one weight left behind leaves the resident set: pages of memory-mapped model files (tinygrad's DISK
  devices; clean, so the kernel drops them) and the freed staging buffers tinygrad's allocator keeps for reuse.
  Measured loading a bf16 checkpoint of Qwen3-0.6B's shapes (2.38 GB of float32 weights on CPU): peak RSS 2.45 GB
  with this, 3.88 GB without."""
  for name in list(Device._opened_devices):
    memory = getattr(Device[name], "mem", None) if name.startswith("DISK:") else None
    if memory is not None and hasattr(memory, "madvise"):
      with contextlib.suppress(ValueError):  # a file tinygrad has closed already
        memory.madvise(mmap.MADV_DONTNEED)
  if hasattr(allocator := Device[device].allocator, "free_cache"):
    allocator.free_cache()


def _prepare(name: str, w: np.ndarray | Tensor, dtype: DType, quantize: str | None, panels: bool) -> dict[str, Tensor]:
  matrix = name.split(".")[-1] in MATMUL_WEIGHTS and w.shape[0] % PANEL == 0
  if quantize == "gguf" and is_blocks(w) and matrix:
    tensors = _gguf_block_tensors(name, w)
  else:
    tensors = {name: _dense(w).cast(dtype)}
  if quantize == "int8" and matrix and tensors[name].shape[1] % QBLOCK == 0:
    tensors = dict(zip((name, name + "_scale"), quantize_int8(tensors[name])))
  if matrix and panels:
    scale = tensors.get(name + "_scale")
    # GGUF blocks on a CPU with VNNI: int8 activations as llama.cpp's (kernels/int_dot.py); --quantize int8 keeps
    # float activations: with int8 ones SmolLM2's France answer flipped on a 0.08-logit near tie
    int_panels = quantize == "gguf" and scale is not None and int_dot.wanted(tensors[name], scale)
    if int_panels:
      tensors = {k: int_dot.int_panels(t) if k == name else to_panels(_half_if_exact(t)) for k, t in tensors.items()}
    else:
      tensors = {k: to_panels(t) for k, t in tensors.items()}
  return {k: t.contiguous().realize() for k, t in tensors.items()}


def _half_if_exact(values: Tensor) -> Tensor:
  """Scales or offsets of int panels as float16 when every value is one exactly (GGUF stores Q4_0-Q8_0's d and m as
  f16; Q4_0's offset -8 x d is one too), so a decode step reads 0.0625 byte per weight less each (Q4_1: 0.625 byte per
  weight in all, as llama.cpp). K-quants' d x 6-bit sub-scale rarely is: those stay float32. The kernels read either."""
  v = values.numpy()
  half = v.astype(np.float16)
  return Tensor(half, device=values.device) if np.array_equal(half.astype(np.float32), v) else values


def _dense(w: np.ndarray | Tensor) -> Tensor:
  """A float tensor of w (bench's random weights are Tensors already). A memory map (GGUF floats, read-only) is copied
  first: Tensor() takes no np.memmap, and tinygrad's OpenCL copy-in cannot read a read-only buffer."""
  if isinstance(w, Tensor):
    return w
  values = dequantize(w)
  return Tensor(values if type(values) is np.ndarray and values.flags.writeable else np.array(values))


def _gguf_block_tensors(name: str, blocks: np.ndarray) -> dict[str, Tensor]:
  """The codes (int8 [N, K], or uint8 [N, K/2] with two 4-bit codes, k even in the low nibble), a scale per group of
  32 (16 for Q6_K) along K and, for the types that have one, an offset (formats/gguf_blocks.py)."""
  codes, scales, offsets = unpack_blocks(blocks)
  if codes.dtype == np.uint8:
    codes = codes[:, 0::2] | codes[:, 1::2] << 4
  out = {name: Tensor(np.ascontiguousarray(codes)), name + "_scale": Tensor(scales)}
  if offsets is not None:
    out[name + "_min"] = Tensor(offsets)
  return out
