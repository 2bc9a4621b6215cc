"""Convert a tiny HF checkpoint (tests/model_factory.py) into a GGUF v3 file, the way llama.cpp's
convert_hf_to_gguf.py does.

Independent of the engine: own GGUF writer and own NumPy GGML quantizers (Q8_0, Q4_0, Q4_1 follow gguf-py's quants.py).
`write_gguf` returns the dequantized HF-named float32 weights, i.e. what the file really holds after the quantization
round trip.
"""

from __future__ import annotations
import json, struct
from pathlib import Path
import zlib

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants
from numpy_ref import rope_parameters
from model_factory import load_numpy_weights

GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8}
GGML_TYPES |= {"Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9}  # general.file_type
FILE_TYPES |= {"Q2_K": 10, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}  # (llama_ftype; K: the _M mixes)
# K-quants: where d (and dmin) sit in a block, and the largest |code x sub-scale| they multiply (ggml-common.h)
K_SCALES = {"Q2_K": (80, 82, 3 * 15), "Q3_K": (108, None, 4 * 32), "Q4_K": (0, 2, 15 * 63), "Q5_K": (0, 2, 31 * 63)}
K_SCALES["Q6_K"] = (208, None, 32 * 128)
# GGUF metadata value types
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64 = 4, 5, 6, 7, 8, 9, 10
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5
ALIGNMENT = 32
QK = 32  # elements per block of Q8_0 / Q4_0 / Q4_1

# ---------------------------------------------------------------- quantization (blocks of 32 along the last numpy axis)


def _blocks(x: np.ndarray) -> np.ndarray:
  assert x.shape[-1] % QK == 0, f"last dimension {x.shape[-1]} is not a multiple of {QK}"
  return x.astype(np.float32).reshape(-1, QK)


def _f16_bytes(a: np.ndarray) -> np.ndarray:
  return a.astype(np.float16).reshape(-1, 1).view(np.uint8)


def quantize(x: np.ndarray, qtype: str) -> tuple[bytes, np.ndarray]:
  """-> (raw GGML bytes, dequantized float32 array of x's shape)."""
  if qtype == "F32":
    return np.ascontiguousarray(x, dtype=np.float32).tobytes(), x.astype(np.float32)
  if qtype == "F16":
    h = np.ascontiguousarray(x, dtype=np.float16)
    return h.tobytes(), h.astype(np.float32)
  if qtype in ("Q5_0", "Q5_1"):  # the gguf package's reference quantizer
    raw = gguf_quants.quantize(np.ascontiguousarray(x, np.float32), GGMLQuantizationType[qtype])
    return raw.tobytes(), gguf_quants.dequantize(raw, GGMLQuantizationType[qtype]).reshape(x.shape)
  if qtype in K_SCALES:
    return _random_k_blocks(x, qtype)
  b = _blocks(x)
  if qtype == "Q8_0":  # d = amax / 127, q = round-half-away(x / d)
    d = np.abs(b).max(-1, keepdims=True) / 127
    with np.errstate(divide="ignore"):
      inv = np.where(d == 0, 0, 1 / d)
    q = np.sign(b * inv) * np.floor(np.abs(b * inv) + 0.5)
    d16 = d.astype(np.float16)
    raw = np.hstack([_f16_bytes(d16), q.astype(np.int8).view(np.uint8)])
    deq = d16.astype(np.float32) * q.astype(np.float32)
  elif qtype == "Q4_0":  # d = (value with the largest |x|) / -8, q = clamp(trunc(x / d + 8.5), 0, 15)
    mx = np.take_along_axis(b, np.abs(b).argmax(-1)[:, None], -1)
    d = mx / -8
    with np.errstate(divide="ignore"):
      inv = np.where(d == 0, 0, 1 / d)
    q = np.trunc(b * inv + 8.5).clip(0, 15).astype(np.uint8)
    d16 = d.astype(np.float16)
    raw = np.hstack([_f16_bytes(d16), q[:, :16] | (q[:, 16:] << 4)])
    deq = (q.astype(np.float32) - 8) * d16.astype(np.float32)
  elif qtype == "Q4_1":  # d = (max - min) / 15, m = min, q = clamp(trunc((x - m) / d + 0.5), 0, 15)
    mx, mn = b.max(-1, keepdims=True), b.min(-1, keepdims=True)
    d = (mx - mn) / 15
    with np.errstate(divide="ignore"):
      inv = np.where(d == 0, 0, 1 / d)
    q = np.trunc((b - mn) * inv + 0.5).clip(0, 15).astype(np.uint8)
    d16, m16 = d.astype(np.float16), mn.astype(np.float16)
    raw = np.hstack([_f16_bytes(d16), _f16_bytes(m16), q[:, :16] | (q[:, 16:] << 4)])
    deq = q.astype(np.float32) * d16.astype(np.float32) + m16.astype(np.float32)
  else:
    raise ValueError(f"unsupported qtype {qtype!r}")
  return raw.astype(np.uint8).tobytes(), deq.reshape(x.shape)


def _random_k_blocks(x: np.ndarray, qtype: str) -> tuple[bytes, np.ndarray]:
  """A simple K-quant 'quantizer': random codes and sub-scales (deterministic per tensor), with d (and dmin) sized so
  each super-block spans about x's range there; what the file holds is what the gguf package dequantizes."""
  kind = GGMLQuantizationType[qtype]
  _, type_size = GGML_QUANT_SIZES[kind]
  blocks = np.ascontiguousarray(x, np.float32).reshape(-1, 256)
  rng = np.random.default_rng(zlib.crc32(blocks.tobytes()))
  raw = rng.integers(0, 256, (len(blocks), type_size), dtype=np.uint8)
  d_at, dmin_at, span = K_SCALES[qtype]
  amax = np.abs(blocks).max(-1, keepdims=True) + 1e-6
  raw[:, d_at : d_at + 2] = _f16_bytes((amax / span).astype(np.float16))
  if dmin_at is not None:
    raw[:, dmin_at : dmin_at + 2] = _f16_bytes((amax / (2 * 63)).astype(np.float16))
  raw = raw.reshape(x.shape[0], -1)
  return raw.tobytes(), gguf_quants.dequantize(raw, kind).reshape(x.shape)


# ---------------------------------------------------------------- GGUF serialization


def _str(s: str) -> bytes:
  b = s.encode("utf-8")
  return struct.pack("<Q", len(b)) + b


_SCALAR = {UINT32: "<I", INT32: "<i", FLOAT32: "<f", BOOL: "<?", UINT64: "<Q"}


def _value(typ: int, v) -> bytes:
  if typ == STRING:
    return _str(v)
  if typ == ARRAY:
    elem, items = v
    return struct.pack("<IQ", elem, len(items)) + b"".join(_value(elem, x) for x in items)
  return struct.pack(_SCALAR[typ], v)


def write_gguf_file(
  path: Path, kv: dict[str, tuple[int, object]], tensors: list[tuple[str, tuple[int, ...], int, bytes]]
) -> None:
  """kv: key -> (value type, value) (arrays: (ARRAY, (elem type, list)));
  tensors: (name, numpy shape, ggml type, raw bytes)."""
  out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(kv))]
  for k, (typ, v) in kv.items():
    out += [_str(k), struct.pack("<I", typ), _value(typ, v)]
  data, off = [], 0
  for name, shape, typ, raw in tensors:
    out += [
      _str(name),
      struct.pack("<I", len(shape)),
      struct.pack(f"<{len(shape)}Q", *reversed(shape)),
      struct.pack("<IQ", typ, off),
    ]
    pad = -len(raw) % ALIGNMENT
    data.append(raw + b"\0" * pad)
    off += len(raw) + pad
  header = b"".join(out)
  Path(path).write_bytes(header + b"\0" * (-len(header) % ALIGNMENT) + b"".join(data))


# ---------------------------------------------------------------- HF -> GGUF conversion


def gguf_name(hf: str) -> str:
  name = hf.removeprefix("model.")
  for a, b in (
    ("embed_tokens.", "token_embd."),
    ("lm_head.", "output."),
    ("layers.", "blk."),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
  ):
    name = name.replace(a, b)
  for n in "qkv":
    name = name.replace(f"self_attn.{n}_proj", f"attn_{n}")
  return "output_norm.weight" if name == "norm.weight" else name


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's LlamaModel.permute: HF rotate-half rows -> interleaved pairs."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(hf: str, cfg: dict) -> int | None:
  """n_head for llama's q/k permutation, None for tensors that are not permuted."""
  if cfg["model_type"] != "llama":
    return None
  if hf.endswith("self_attn.q_proj.weight"):
    return cfg["num_attention_heads"]
  if hf.endswith("self_attn.k_proj.weight"):
    return cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
  return None


def gguf_tensors(weights: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
  """HF-named weights -> the GGUF-named arrays a converted file holds (llama q/k permuted)."""
  out = {}
  for hf, w in weights.items():
    n = _rope_heads(hf, cfg)
    out[gguf_name(hf)] = permute_rope(w, n) if n else w
  return out


def tokenizer_metadata(hf_dir: Path, vocab_size: int, pre: str) -> dict[str, tuple[int, object]]:
  tj = json.loads((hf_dir / "tokenizer.json").read_text())
  tc = json.loads((hf_dir / "tokenizer_config.json").read_text()) if (hf_dir / "tokenizer_config.json").exists() else {}
  vocab = dict(tj["model"]["vocab"])
  added = {t["content"]: t for t in tj.get("added_tokens", [])}
  vocab |= {c: t["id"] for c, t in added.items()}
  by_id = {i: t for t, i in vocab.items()}
  tokens, types = [], []
  for i in range(max(vocab_size, len(vocab))):  # like convert_hf_to_gguf: pad the vocab up to the embedding rows
    t = by_id.get(i)
    if t is None:
      tokens.append(f"[PAD{i}]")
      types.append(TOKEN_UNUSED)
    else:
      tokens.append(t)
      types.append(TOKEN_CONTROL if t in added and added[t].get("special") else TOKEN_NORMAL)
  merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]

  def tok_id(key):
    if not (s := tc.get(key)):
      return None
    return vocab[s if isinstance(s, str) else s["content"]]

  kv: dict[str, tuple[int, object]] = {
    "tokenizer.ggml.model": (STRING, "gpt2"),
    "tokenizer.ggml.pre": (STRING, pre),
    "tokenizer.ggml.tokens": (ARRAY, (STRING, tokens)),
    "tokenizer.ggml.token_type": (ARRAY, (INT32, types)),
    "tokenizer.ggml.merges": (ARRAY, (STRING, merges)),
  }
  for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
    if (i := tok_id(key)) is not None:
      kv[f"tokenizer.ggml.{field}"] = (UINT32, i)
  if "add_bos_token" in tc:
    kv["tokenizer.ggml.add_bos_token"] = (BOOL, bool(tc["add_bos_token"]))
  if tc.get("chat_template"):
    kv["tokenizer.chat_template"] = (STRING, tc["chat_template"])
  return kv


def write_gguf(
  path,
  hf_dir,
  qtype: str = "Q8_0",
  *,
  arch: str | None = None,
  pre: str = "gpt2",
  edit_metadata: dict[str, tuple[int, object] | None] | None = None,
  qtypes: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
  """Write `hf_dir` as GGUF to `path`; 2-D weights in `qtype`, 1-D tensors F32. Returns the dequantized HF-named
  float32 weights.
  `arch` overrides general.architecture (keys keep the real one);
  `edit_metadata` sets (type, value) or drops (None) keys;
  `qtypes` gives single GGUF tensors (by name) another type, as llama.cpp's mixed files do."""
  hf_dir, path = Path(hf_dir), Path(path)
  cfg = json.loads((hf_dir / "config.json").read_text())
  a = cfg["model_type"]
  nh = cfg["num_attention_heads"]
  kv: dict[str, tuple[int, object]] = {
    "general.architecture": (STRING, arch or a),
    "general.name": (STRING, hf_dir.name),
    "general.alignment": (UINT32, ALIGNMENT),
    "general.file_type": (UINT32, FILE_TYPES[qtype]),
    f"{a}.block_count": (UINT32, cfg["num_hidden_layers"]),
    f"{a}.context_length": (UINT32, cfg["max_position_embeddings"]),
    f"{a}.embedding_length": (UINT32, cfg["hidden_size"]),
    f"{a}.feed_forward_length": (UINT32, cfg["intermediate_size"]),
    f"{a}.attention.head_count": (UINT32, nh),
    f"{a}.attention.head_count_kv": (UINT32, cfg.get("num_key_value_heads") or nh),
    f"{a}.rope.freq_base": (FLOAT32, rope_parameters(cfg)["rope_theta"]),
    f"{a}.attention.layer_norm_rms_epsilon": (FLOAT32, cfg["rms_norm_eps"]),
  }
  if (hd := cfg.get("head_dim")) is not None:
    kv |= {f"{a}.attention.key_length": (UINT32, hd), f"{a}.attention.value_length": (UINT32, hd)}
  if a == "llama":
    kv |= {
      f"{a}.vocab_size": (UINT32, cfg["vocab_size"]),
      f"{a}.rope.dimension_count": (UINT32, hd or cfg["hidden_size"] // nh),
    }
  kv |= tokenizer_metadata(hf_dir, cfg["vocab_size"], pre)
  kv |= rope_scaling_metadata(cfg, a)
  for k, v in (edit_metadata or {}).items():
    if v is None:
      kv.pop(k, None)
    else:
      kv[k] = v

  tensors, deq = [], {}
  for hf, w in load_numpy_weights(hf_dir).items():
    n = _rope_heads(hf, cfg)
    g = permute_rope(w, n) if n else w
    t = (
      (qtypes or {}).get(gguf_name(hf), qtype) if g.ndim == 2 else "F32"
    )  # norms and biases stay F32, as llama.cpp does
    raw, d = quantize(g, t)
    tensors.append((gguf_name(hf), g.shape, GGML_TYPES[t], raw))
    deq[hf] = unpermute_rope(d, n) if n else d
  if (factors := llama3_rope_factors(cfg)) is not None:  # what llama.cpp's converter writes for Llama 3.1+
    tensors.append(("rope_freqs.weight", factors.shape, GGML_TYPES["F32"], factors.tobytes()))
  write_gguf_file(path, kv, tensors)
  return deq


def rope_scaling_metadata(cfg: dict, arch: str) -> dict:
  p = rope_parameters(cfg)
  if p.get("rope_type") not in ("linear", "yarn"):
    return {}
  original = p.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
  return {
    f"{arch}.rope.scaling.type": (STRING, p["rope_type"]),
    f"{arch}.rope.scaling.factor": (FLOAT32, p["factor"]),
    f"{arch}.rope.scaling.original_context_length": (UINT32, original),
  }


def llama3_rope_factors(cfg: dict) -> np.ndarray | None:
  """Per-frequency divisors, as llama.cpp's convert_hf_to_gguf.py computes them for rope_type llama3."""
  p = rope_parameters(cfg)
  if p.get("rope_type") != "llama3":
    return None
  d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
  base, factor, low, high = p["rope_theta"], p["factor"], p["low_freq_factor"], p["high_freq_factor"]
  original = p["original_max_position_embeddings"]
  factors = []
  for freq in 1.0 / base ** (np.arange(0, d, 2) / d):
    wavelen = 2 * np.pi / freq
    if wavelen < original / high:
      factors.append(1.0)
    elif wavelen > original / low:
      factors.append(factor)
    else:
      smooth = (original / wavelen - low) / (high - low)
      factors.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(factors, np.float32)
