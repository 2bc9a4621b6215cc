"""Tiny random Hugging Face-style checkpoints (llama / qwen2 / qwen3) for tests."""

from __future__ import annotations
import functools, json, struct
from pathlib import Path
import numpy as np
from safetensors.numpy import save_file

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
  "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
  "Hello world, the capital of France is Paris.",
  "The quick brown fox jumps over the lazy dog.",
  "Once upon a time there was a little girl who lived in a village near the forest.",
  "The capital of Germany is Berlin and the capital of Italy is Rome.",
  "Machine learning models learn patterns from data, and language models predict the next token.",
  "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
  "In the beginning the world was quiet; then the people started to talk, to write and to sing.",
  "What is the answer to this question? The answer is forty two, said the computer.",
  "We hold these truths to be self evident, that all men are created equal.",
  "To be, or not to be, that is the question: whether it is nobler in the mind to suffer.",
  "The weather today is sunny with a chance of rain in the evening.",
  "Numbers like 1, 2, 3, 10, 42 and 100 appear in the text as well.",
]
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


@functools.lru_cache(maxsize=None)
def tokenizer_json(vocab_size: int = 300) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, min_frequency=1, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(CORPUS, trainer)
  tok.add_special_tokens(SPECIAL_TOKENS)
  return tok.to_str(pretty=True)


def _bf16_bits(a: np.ndarray) -> np.ndarray:
  u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
  return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _save_bf16(tensors: dict[str, np.ndarray], path: Path) -> None:
  header: dict = {"__metadata__": {"format": "pt"}}
  blobs, off = [], 0
  for name, t in tensors.items():
    b = _bf16_bits(t).tobytes()
    header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
  h = json.dumps(header, separators=(",", ":")).encode()
  h += b" " * (-len(h) % 8)
  path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def _save(tensors: dict[str, np.ndarray], path: Path, dtype: str) -> None:
  if dtype == "bfloat16":
    _save_bf16(tensors, path)
  else:
    save_file(
      {k: np.ascontiguousarray(v.astype(_NP_DTYPES[dtype])) for k, v in tensors.items()},
      str(path),
      metadata={"format": "pt"},
    )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  data = path.read_bytes()
  n = struct.unpack("<Q", data[:8])[0]
  header = json.loads(data[8 : 8 + n])
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    s, e = info["data_offsets"]
    a = np.frombuffer(data[8 + n + s : 8 + n + e], dtype=_ST_DTYPES[info["dtype"]])
    if info["dtype"] == "BF16":
      a = (a.astype(np.uint32) << 16).view(np.float32)
    out[name] = a.astype(np.float32).reshape(info["shape"])
  return out


def load_numpy_weights(dirpath: Path) -> dict[str, np.ndarray]:
  dirpath = Path(dirpath)
  index = dirpath / "model.safetensors.index.json"
  files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
  out: dict[str, np.ndarray] = {}
  for f in files:
    out.update(_read_safetensors(dirpath / f))
  return out


def random_weights(cfg: dict, seed: int, qk_gain: float = 1.0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  H, I, V, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
  nh, nkv, qwen2, qwen3 = (
    cfg["num_attention_heads"],
    cfg["num_key_value_heads"],
    cfg["model_type"] == "qwen2",
    cfg["model_type"] == "qwen3",
  )

  def lin(o, i, gain=1.0):
    return (rng.standard_normal((o, i)) * gain / np.sqrt(i)).astype(np.float32)

  def norm(n):
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

  w = {"model.embed_tokens.weight": rng.standard_normal((V, H)).astype(np.float32)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    w[p + "input_layernorm.weight"] = norm(H)
    w[p + "self_attn.q_proj.weight"] = lin(nh * D, H, 1.5 * qk_gain)
    w[p + "self_attn.k_proj.weight"] = lin(nkv * D, H, 1.5 * qk_gain)
    w[p + "self_attn.v_proj.weight"] = lin(nkv * D, H)
    w[p + "self_attn.o_proj.weight"] = lin(H, nh * D, 2.0)
    if qwen2:
      for n, o in (("q", nh * D), ("k", nkv * D), ("v", nkv * D)):
        w[p + f"self_attn.{n}_proj.bias"] = (0.1 * rng.standard_normal(o)).astype(np.float32)
    if qwen3:
      w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"] = norm(D), norm(D)
    w[p + "post_attention_layernorm.weight"] = norm(H)
    w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"] = (
      lin(I, H),
      lin(I, H),
      lin(H, I, 2.0),
    )
  w["model.norm.weight"] = norm(H)
  if not cfg["tie_word_embeddings"]:
    w["lm_head.weight"] = lin(V, H, 4.0)
  return w


def make_checkpoint(
  dirpath: Path,
  family: str,
  seed: int = 0,
  *,
  vocab_size: int = 384,
  hidden_size: int = 64,
  intermediate_size: int = 128,
  num_layers: int = 2,
  num_heads: int = 4,
  num_kv_heads: int = 2,
  head_dim: int | None = None,
  tie_word_embeddings: bool = False,
  max_position_embeddings: int = 1024,
  rope_theta: float = 10000.0,
  rms_norm_eps: float = 1e-5,
  dtype: str = "float32",
  shards: int = 1,
  config_overrides: dict | None = None,
  qk_gain: float = 1.0,
) -> Path:
  """config_overrides: config.json keys to set; a value of None removes the key (e.g. rope_theta in the
  transformers 5 layout). qk_gain > 1 sharpens attention, so a wrong position or frequency shows in the logits."""
  assert (
    family in ARCHITECTURES
    and dtype in ("float32", "float16", "bfloat16")
    and 1 <= shards <= 4 * num_layers
    and vocab_size >= 262
  )
  dirpath = Path(dirpath)
  dirpath.mkdir(parents=True, exist_ok=True)
  tok_json = tokenizer_json(min(300, vocab_size - len(SPECIAL_TOKENS)))
  (dirpath / "tokenizer.json").write_text(tok_json)
  vocab = json.loads(tok_json)["model"]["vocab"] | {t["content"]: t["id"] for t in json.loads(tok_json)["added_tokens"]}
  bos, eos = vocab["<|endoftext|>"], vocab["<|im_end|>"]

  write_head_dim = family == "qwen3" or head_dim is not None
  if head_dim is None:
    head_dim = 2 * hidden_size // num_heads if family == "qwen3" else hidden_size // num_heads
  assert family != "qwen2" or head_dim * num_heads == hidden_size, "qwen2 has no head_dim field"
  cfg = {
    "architectures": [ARCHITECTURES[family]],
    "model_type": family,
    "vocab_size": vocab_size,
    "hidden_size": hidden_size,
    "intermediate_size": intermediate_size,
    "num_hidden_layers": num_layers,
    "num_attention_heads": num_heads,
    "num_key_value_heads": num_kv_heads,
    **({"head_dim": head_dim} if write_head_dim else {}),
    "hidden_act": "silu",
    "rms_norm_eps": rms_norm_eps,
    "rope_theta": rope_theta,
    "rope_scaling": None,
    "max_position_embeddings": max_position_embeddings,
    "tie_word_embeddings": tie_word_embeddings,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "bos_token_id": bos,
    "eos_token_id": eos,
    "torch_dtype": dtype,
    "transformers_version": "4.51.0",
  }
  if family == "llama":
    cfg |= {"attention_bias": False, "mlp_bias": False}
  else:
    cfg |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": num_layers}
  if family == "qwen3":
    cfg["attention_bias"] = False
  cfg |= config_overrides or {}
  cfg = {k: v for k, v in cfg.items() if v is not None or k not in (config_overrides or {})}
  (dirpath / "config.json").write_text(json.dumps(cfg, indent=2))
  (dirpath / "generation_config.json").write_text(
    json.dumps(
      {"bos_token_id": bos, "eos_token_id": eos, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20},
      indent=2,
    )
  )
  (dirpath / "tokenizer_config.json").write_text(
    json.dumps(
      {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
      },
      indent=2,
    )
  )

  weights = random_weights(cfg | {"head_dim": head_dim}, seed, qk_gain)
  if shards == 1:
    _save(weights, dirpath / "model.safetensors", dtype)
    return dirpath
  names = list(weights)
  weight_map, itemsize = {}, 4 if dtype == "float32" else 2
  for k, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
    fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
    _save({names[j]: weights[names[j]] for j in chunk}, dirpath / fname, dtype)
    weight_map |= {names[j]: fname for j in chunk}
  total = sum(v.size * itemsize for v in weights.values())
  (dirpath / "model.safetensors.index.json").write_text(
    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
  )
  return dirpath
