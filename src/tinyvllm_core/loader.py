from __future__ import annotations
import json, struct
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
from tinygrad import Tensor
from .config import ConfigError, ModelConfig, GGUF_ARCHITECTURES, read_json

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}

def read_safetensors(path: Path) -> dict[str, np.ndarray]:
  """float32 arrays from a .safetensors file (own parser: numpy has no bfloat16)."""
  try:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    (header_len,) = struct.unpack("<Q", data[:8].tobytes())
    header = json.loads(data[8:8 + header_len].tobytes())
  except (OSError, ValueError, struct.error) as e: raise ConfigError(f"{path}: not a valid safetensors file ({e})") from None
  out, base = {}, 8 + header_len
  for name, info in header.items():
    if name == "__metadata__": continue
    if info.get("dtype") not in _ST_DTYPES: raise ConfigError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    start, end = info["data_offsets"]
    if base + end > len(data): raise ConfigError(f"{path}: truncated (tensor {name!r} ends past the end of the file); download it again")
    arr = np.frombuffer(data[base + start:base + end].tobytes(), dtype=_ST_DTYPES[info["dtype"]])
    if info["dtype"] == "BF16": arr = (arr.astype(np.uint32) << 16).view(np.float32)
    out[name] = arr.astype(np.float32).reshape(info["shape"])
  return out

def _hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
  index = model_dir / "model.safetensors.index.json"
  files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else sorted(p.name for p in model_dir.glob("*.safetensors"))
  if not files: raise ConfigError(f"{model_dir}: no *.safetensors weights found")
  if (missing := next((f for f in files if not (model_dir / f).exists()), None)):
    raise ConfigError(f"{model_dir / missing}: missing weight shard listed in model.safetensors.index.json")
  return {k.removeprefix("model."): v for f in files for k, v in read_safetensors(model_dir / f).items()}

# GGUF blocks of 32 weights along K kept as stored: Q4_0 (2), Q4_1 (3), Q8_0 (8); weight = code * d (+ m, or - 8 * d for Q4_0)
GGUF_BLOCKS = {2: np.dtype([("d", "<f2"), ("qs", "u1", 16)]), 3: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]), 8: np.dtype([("d", "<f2"), ("qs", "i1", 32)])}

def unpack_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """[N, K/32] blocks -> codes [N, K/32, 32] (int8, or uint8 0..15), scales and offsets [N, K/32] (None for Q8_0)."""
  d, qs = np.array(blocks["d"], np.float32), np.array(blocks["qs"])  # plain arrays, not memmaps
  if qs.dtype == np.int8: return qs, d, None
  return np.concatenate([qs & 15, qs >> 4], -1), d, np.array(blocks["m"], np.float32) if "m" in blocks.dtype.names else -8 * d  # low nibbles hold weights 0-15

def is_blocks(w) -> bool: return isinstance(w, np.ndarray) and w.dtype.names is not None

def dequantize(w: np.ndarray) -> np.ndarray:
  if not is_blocks(w): return w
  q, d, m = unpack_blocks(w)
  return (q * d[..., None] + (0 if m is None else m[..., None])).reshape(len(w), -1).astype(np.float32)

def to_tensors(weights: dict[str, np.ndarray], dtype, keep_blocks: bool) -> dict[str, Tensor]:
  """GGUF blocks kept: name (int8 codes [N, K], or uint8 [N, K/2] with two 4-bit codes, k even in the low nibble), name_scale, name_min."""
  out = {}
  for name, w in weights.items():
    if not (keep_blocks and is_blocks(w)): out[name] = (w if isinstance(w, Tensor) else Tensor(dequantize(w))).cast(dtype).contiguous().realize()
    else:
      (q, d, m), n = unpack_blocks(w), len(w)
      out |= {name: Tensor(q.reshape(n, -1) if m is None else q[..., 0::2] | q[..., 1::2] << 4).reshape(n, -1).realize(), name + "_scale": Tensor(d).realize()}
      if m is not None: out[name + "_min"] = Tensor(m).realize()
  return out

def canonical_weights(cfg: ModelConfig, sd: dict[str, np.ndarray], names: dict[str, str], source: Path) -> dict[str, np.ndarray]:
  """Fuse q/k/v and gate/up; `names` maps our names to the checkpoint's ({i} = layer)."""
  H, I, q_rows, kv_rows = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  shapes = {"embed": (cfg.vocab_size, H), "lm_head": (cfg.vocab_size, H), "q": (q_rows, H), "k": (kv_rows, H), "v": (kv_rows, H),
            "o": (H, q_rows), "gate": (I, H), "up": (I, H), "down": (H, I)}
  def get(key: str, i: int = 0) -> np.ndarray:
    name = names[key].format(i=i)
    if name not in sd: raise ConfigError(f"{source}: tensor {name!r} is missing from the checkpoint")
    shape = (*sd[name].shape[:-1], sd[name].shape[-1] * 32) if is_blocks(sd[name]) else sd[name].shape  # GGUF blocks of 32
    if key in shapes and shape != shapes[key]:
      raise ConfigError(f"{source}: tensor {name!r} has shape {shape}, the config says {shapes[key]}; config and weights do not match")
    return sd[name]
  def cat(*parts: np.ndarray) -> np.ndarray: return np.concatenate(parts if len({p.dtype for p in parts}) == 1 else [dequantize(p) for p in parts])
  w = {"embed": get("embed"), "norm": get("norm")}
  w["lm_head"] = w["embed"] if cfg.tie_word_embeddings or names["lm_head"] not in sd else get("lm_head")
  for i in range(cfg.num_layers):
    p = f"layers.{i}."
    w[p + "qkv"], w[p + "gate_up"] = cat(get("q", i), get("k", i), get("v", i)), cat(get("gate", i), get("up", i))
    for key in ("o", "down", "attn_norm", "mlp_norm"): w[p + key] = get(key, i)
    if cfg.qkv_bias: w[p + "qkv_bias"] = cat(get("q_bias", i), get("k_bias", i), get("v_bias", i))
    if cfg.qk_norm: w[p + "q_norm"], w[p + "k_norm"] = get("q_norm", i), get("k_norm", i)
  return w

HF_NAMES = {"embed": "embed_tokens.weight", "norm": "norm.weight", "lm_head": "lm_head.weight",
            **{k: f"layers.{{i}}.self_attn.{k}_proj.weight" for k in "qkvo"}, **{f"{k}_bias": f"layers.{{i}}.self_attn.{k}_proj.bias" for k in "qkv"},
            **{k: f"layers.{{i}}.self_attn.{k}.weight" for k in ("q_norm", "k_norm")}, **{k: f"layers.{{i}}.mlp.{k}_proj.weight" for k in ("gate", "up", "down")},
            "attn_norm": "layers.{i}.input_layernorm.weight", "mlp_norm": "layers.{i}.post_attention_layernorm.weight"}
GGUF_NAMES = {"embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight", "o": "blk.{i}.attn_output.weight",
              **{k: f"blk.{{i}}.attn_{k}.weight" for k in ("q", "k", "v", "q_norm", "k_norm")}, **{f"{k}_bias": f"blk.{{i}}.attn_{k}.bias" for k in "qkv"},
              **{k: f"blk.{{i}}.ffn_{k}.weight" for k in ("gate", "up", "down")}, "attn_norm": "blk.{i}.attn_norm.weight", "mlp_norm": "blk.{i}.ffn_norm.weight"}

@dataclass
class ModelFiles:
  config: ModelConfig
  weights: dict[str, np.ndarray]
  tokenizer: object  # tokenizers.Tokenizer
  chat_template: str | None = None
  special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token / eos_token strings for templates
  eos_token_ids: list[int] = field(default_factory=list)
  generation_config: dict = field(default_factory=dict)

def load_hf(model_dir: Path) -> ModelFiles:
  from tokenizers import Tokenizer
  cfg = ModelConfig.from_hf(model_dir / "config.json")
  if not (model_dir / "tokenizer.json").exists(): raise ConfigError(f"{model_dir}: tokenizer.json is missing")
  try: tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
  except Exception as e: raise ConfigError(f"{model_dir / 'tokenizer.json'}: cannot be read ({e})") from None
  tok_cfg, gen_cfg, raw_cfg = (read_json(model_dir / f"{name}.json") for name in ("tokenizer_config", "generation_config", "config"))
  template = tok_cfg.get("chat_template")
  if isinstance(template, list): template = next((t["template"] for t in template if t.get("name") == "default"), None)
  if template is None and (model_dir / "chat_template.jinja").exists(): template = (model_dir / "chat_template.jinja").read_text()
  eos = gen_cfg.get("eos_token_id", raw_cfg.get("eos_token_id"))
  eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
  special = {k: s for k, t in tok_cfg.items() if k in ("bos_token", "eos_token") and (s := t.get("content") if isinstance(t, dict) else t)}
  return ModelFiles(cfg, canonical_weights(cfg, _hf_weights(model_dir), HF_NAMES, model_dir), tokenizer, template, special, eos_ids, gen_cfg)

def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """GGUF llama q/k rows are interleaved for llama.cpp's RoPE; back to the HF rotate-half layout."""
  return w.reshape(n_heads, -1, 2, w.shape[-1]).swapaxes(1, 2).reshape(w.shape)

@dataclass
class GGUFTensorInfo:
  name: str
  shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
  ggml_type: int
  offset: int  # bytes from the start of the file

def read_gguf_header(path: Path) -> tuple[dict, list[GGUFTensorInfo]]:
  """A GGUF file's metadata and tensor table, without reading the tensors."""
  from tinygrad.llm.gguf import readers, read_str, read_int32, read_uint32, read_uint64
  with open(path, "rb") as r:
    if r.read(4) != b"GGUF": raise ConfigError(f"{path}: not a GGUF file (no GGUF magic)")
    r.read(4)  # version
    n_tensors, n_kv = read_uint64(r), read_uint64(r)
    kv = {read_str(r): readers[read_int32(r)](r) for _ in range(n_kv)}
    infos = [(read_str(r), tuple(read_uint64(r) for _ in range(read_uint32(r))), read_int32(r), read_uint64(r)) for _ in range(n_tensors)]
    start = -(-r.tell() // (align := kv.get("general.alignment", 32))) * align
  return kv, [GGUFTensorInfo(name, dims, kind, start + offset) for name, dims, kind, offset in infos]

def _gguf_blocks(path: Path) -> dict[str, np.ndarray]:
  """The Q4_0 / Q4_1 / Q8_0 matrices of a GGUF file as memory-mapped [rows, K/32] blocks (rows a multiple of 8: CPU panels)."""
  _, infos = read_gguf_header(path)
  return {t.name: np.memmap(path, GGUF_BLOCKS[t.ggml_type], "r", t.offset, (t.shape[1], t.shape[0] // 32))
          for t in infos if t.ggml_type in GGUF_BLOCKS and len(t.shape) == 2 and t.shape[1] % 8 == 0}

def load_gguf(path: Path, device: str) -> ModelFiles:
  from tinygrad.llm.gguf import gguf_load
  try: kv, sd = gguf_load(Tensor(path).to(device))
  except (ValueError, KeyError, IndexError, UnicodeDecodeError, RuntimeError, struct.error) as e: raise ConfigError(f"{path}: not a valid GGUF file ({e})") from None
  arch = kv.get("general.architecture", "?")
  if arch not in GGUF_ARCHITECTURES: raise ConfigError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})")
  def need(key: str):
    if f"{arch}.{key}" not in kv: raise ConfigError(f"{path}: metadata field '{arch}.{key}' is missing")
    return kv[f"{arch}.{key}"]
  if "tokenizer.ggml.tokens" not in kv: raise ConfigError(f"{path}: metadata field 'tokenizer.ggml.tokens' is missing (no embedded tokenizer)")
  heads, hidden = need("attention.head_count"), need("embedding_length")
  cfg = ModelConfig(family=GGUF_ARCHITECTURES[arch], vocab_size=len(kv["tokenizer.ggml.tokens"]), hidden_size=hidden,
                    intermediate_size=need("feed_forward_length"), num_layers=need("block_count"), num_heads=heads,
                    num_kv_heads=kv.get(f"{arch}.attention.head_count_kv", heads), head_dim=kv.get(f"{arch}.attention.key_length", hidden // heads),
                    rms_norm_eps=need("attention.layer_norm_rms_epsilon"), rope_theta=kv.get(f"{arch}.rope.freq_base", 10000.0),
                    max_position_embeddings=need("context_length"), tie_word_embeddings="output.weight" not in sd)
  try: blocks = _gguf_blocks(path); weights = {k: blocks[k] if k in blocks else v.float().numpy() for k, v in sd.items()}
  except Exception as e: raise ConfigError(f"{path}: tensor data cannot be decoded ({e}); the file may be truncated") from None
  if arch == "llama":
    for i in range(cfg.num_layers):
      for name, n in ((f"blk.{i}.attn_q.weight", cfg.num_heads), (f"blk.{i}.attn_k.weight", cfg.num_kv_heads)):
        if name in weights: weights[name] = _unpermute_rope(weights[name], n)
  special = {k: kv["tokenizer.ggml.tokens"][kv[f"tokenizer.ggml.{k}_id"]] for k in ("bos_token", "eos_token") if f"tokenizer.ggml.{k}_id" in kv}
  eos_ids = [kv["tokenizer.ggml.eos_token_id"]] if "tokenizer.ggml.eos_token_id" in kv else []
  return ModelFiles(cfg, canonical_weights(cfg, weights, GGUF_NAMES, path), _gguf_tokenizer(kv, path), kv.get("tokenizer.chat_template"), special, eos_ids)

# GGUF tokenizer.ggml.pre -> regex split before byte-level BPE; the two differ only in how digits group
_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|DIGITS| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_PRE_SPLIT = {"llama-bpe": _SPLIT.replace("DIGITS", r"\p{N}{1,3}"), "qwen2": _SPLIT.replace("DIGITS", r"\p{N}")}

def _gguf_tokenizer(kv: dict, path: Path):
  from tokenizers import Tokenizer, AddedToken, Regex, models, pre_tokenizers, decoders, processors
  if kv.get("tokenizer.ggml.model") != "gpt2":
    raise ConfigError(f"{path}: GGUF tokenizer model {kv.get('tokenizer.ggml.model')!r} is not supported (byte-level BPE 'gpt2' only); use the HF checkpoint")
  tokens, merges = kv["tokenizer.ggml.tokens"], [tuple(m.split(" ", 1)) for m in kv.get("tokenizer.ggml.merges", [])]
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
  pre = kv.get("tokenizer.ggml.pre", "gpt2")
  splits = [pre_tokenizers.Split(Regex(_PRE_SPLIT[pre]), "isolated")] if pre in _PRE_SPLIT else []
  if pre == "smollm": splits = [pre_tokenizers.Digits(individual_digits=True)]
  tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _PRE_SPLIT)])
  tok.decoder = decoders.ByteLevel()
  types = kv.get("tokenizer.ggml.token_type", [])
  tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in (3, 4)])
  if kv.get("tokenizer.ggml.add_bos_token") and "tokenizer.ggml.bos_token_id" in kv:
    bos = tokens[kv["tokenizer.ggml.bos_token_id"]]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, kv["tokenizer.ggml.bos_token_id"])])
  return tok

def load_model_files(path: str | Path, device: str) -> ModelFiles:
  path = Path(path).expanduser()
  if not path.exists(): raise ConfigError(f"{path}: no such file or directory")
  if path.is_file() and path.suffix != ".gguf": raise ConfigError(f"{path}: expected a model directory or a .gguf file")
  return load_gguf(path, device) if path.is_file() else load_hf(path)

def render_chat(template: str | None, messages: list[dict], special_tokens: dict[str, str], add_generation_prompt: bool = True, **kwargs) -> str:
  import jinja2.sandbox
  if not template: raise ConfigError("this model has no chat template; send a plain prompt instead")
  def raise_exception(msg: str): raise ValueError(f"chat template: {msg}")
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.globals["raise_exception"] = raise_exception
  env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
  try: return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **{"bos_token": "", "eos_token": "", **special_tokens}, **kwargs)
  except jinja2.TemplateError as e: raise ConfigError(f"chat template failed to render ({e})") from None
