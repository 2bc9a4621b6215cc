import json, math
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from model_factory import load_numpy_weights, make_checkpoint, tokenizer_json
from numpy_ref import reference_greedy, reference_logits

TOKENS = [5, 77, 300, 12, 150, 9, 260, 33]


def _load(d):
  return load_numpy_weights(d), json.loads((d / "config.json").read_text())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_checkpoint_roundtrip(tmp_path, family, dtype):
  d = make_checkpoint(tmp_path / "m", family, dtype=dtype)
  w, cfg = _load(d)
  assert cfg["architectures"] == [
    {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
  ]
  assert cfg["torch_dtype"] == dtype and cfg["model_type"] == family
  D = cfg.get("head_dim", 16)
  assert D == (32 if family == "qwen3" else 16) and ("head_dim" in cfg) == (family == "qwen3")
  assert w["model.embed_tokens.weight"].shape == (384, 64) and w["lm_head.weight"].shape == (384, 64)
  assert w["model.layers.1.self_attn.q_proj.weight"].shape == (4 * D, 64)
  assert w["model.layers.1.self_attn.k_proj.weight"].shape == (2 * D, 64)
  assert w["model.layers.1.self_attn.o_proj.weight"].shape == (64, 4 * D)
  assert w["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
  assert ("model.layers.0.self_attn.q_proj.bias" in w) == (family == "qwen2")
  assert ("model.layers.0.self_attn.k_norm.weight" in w) == (family == "qwen3")
  if family == "qwen3":
    assert w["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
  assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in w.values())
  if dtype != "bfloat16":  # the safetensors library agrees with our own reader
    ref = load_file(str(d / "model.safetensors"))
    assert all(np.array_equal(ref[k].astype(np.float32), w[k]) for k in w) and set(ref) == set(w)
  f32, _ = _load(make_checkpoint(tmp_path / "f32", family))
  tol = {"float32": 0, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
  for k in w:
    np.testing.assert_allclose(w[k], f32[k], rtol=tol, atol=tol * 1e-2)


def test_bf16_rounding(tmp_path):
  from model_factory import _bf16_bits

  x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, -2.5], dtype=np.float32)
  back = (_bf16_bits(x).astype(np.uint32) << 16).view(np.float32)
  assert back.tolist() == [1.0, 1.0, 1.0 + 4 * 2**-8, 1.0 + 2 * 2**-8, -2.5]


def test_shards_and_tied(tmp_path):
  d = make_checkpoint(tmp_path / "m", "qwen2", shards=3, tie_word_embeddings=True, dtype="bfloat16")
  index = json.loads((d / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
  assert all((d / f).exists() for f in files) and not (d / "model.safetensors").exists()
  w, cfg = _load(d)
  assert set(w) == set(index["weight_map"]) and "lm_head.weight" not in w and cfg["tie_word_embeddings"]
  assert index["metadata"]["total_size"] == 2 * sum(v.size for v in w.values())
  single, _ = _load(make_checkpoint(tmp_path / "s", "qwen2", tie_word_embeddings=True, dtype="bfloat16"))
  assert all(np.array_equal(single[k], w[k]) for k in w)
  assert np.isfinite(reference_logits(w, cfg, TOKENS)).all()


def test_tokenizer(tmp_path):
  d = make_checkpoint(tmp_path / "m", "llama")
  assert tokenizer_json() == tokenizer_json.__wrapped__()  # deterministic training
  tok = Tokenizer.from_file(str(d / "tokenizer.json"))
  text = "Hello world, the capital of France is Paris."
  ids = tok.encode(text).ids
  assert tok.decode(ids) == text and len(ids) < len(text) and max(ids) < 300
  cfg, tcfg = json.loads((d / "config.json").read_text()), json.loads((d / "tokenizer_config.json").read_text())
  for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]:
    assert len(tok.encode(s).ids) == 1
  assert tok.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == tok.token_to_id("<|im_start|>")
  assert cfg["eos_token_id"] == tok.token_to_id("<|im_end|>") and cfg["bos_token_id"] == tok.token_to_id(
    "<|endoftext|>"
  )
  assert tcfg["eos_token"] == "<|im_end|>" and "<|im_start|>" in tcfg["chat_template"]
  assert tok.get_vocab_size() <= cfg["vocab_size"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_reference_causal(tmp_path, family):
  w, cfg = _load(make_checkpoint(tmp_path / "m", family, seed=1))
  base = reference_logits(w, cfg, TOKENS)
  assert base.shape == (len(TOKENS), 384) and np.isfinite(base).all()
  assert 1.0 < base.std() < 20.0
  earlier = reference_logits(w, cfg, [TOKENS[0] + 1] + TOKENS[1:])
  assert np.abs(earlier[1:] - base[1:]).max(axis=-1).min() > 1e-3
  later = reference_logits(w, cfg, TOKENS[:-1] + [TOKENS[-1] + 1])
  np.testing.assert_allclose(later[:-1], base[:-1], rtol=1e-6, atol=1e-6)
  assert np.abs(later[-1] - base[-1]).max() > 1e-3
  prefix = reference_logits(w, cfg, TOKENS[:3])
  np.testing.assert_allclose(prefix, base[:3], rtol=1e-5, atol=1e-5)
  out = reference_greedy(w, cfg, TOKENS[:4], 4)
  assert len(out) == 4 and out[0] == int(np.argmax(base[3]))


def test_reference_matches_loops(tmp_path):
  w, cfg = _load(make_checkpoint(tmp_path / "m", "llama", seed=3, num_layers=1))
  toks = [3, 100, 42, 250, 7]
  T, nh, nkv, D, eps, theta = len(toks), 4, 2, 16, cfg["rms_norm_eps"], cfg["rope_theta"]
  L = {k: v.astype(np.float64) for k, v in w.items()}
  p = "model.layers.0."

  def norm(x, g):
    r = math.sqrt(sum(float(e) ** 2 for e in x) / len(x) + eps)
    return np.array([x[j] / r * g[j] for j in range(len(x))])

  def rot(vec, t):
    out = np.zeros(D)
    for j in range(D // 2):
      a = t / theta ** (2 * j / D)
      c, s = math.cos(a), math.sin(a)
      out[j] = vec[j] * c - vec[j + D // 2] * s
      out[j + D // 2] = vec[j + D // 2] * c + vec[j] * s
    return out

  xs = [L["model.embed_tokens.weight"][t] for t in toks]
  hs = [norm(x, L[p + "input_layernorm.weight"]) for x in xs]
  q = L[p + "self_attn.q_proj.weight"] @ hs[-1]
  ks = [L[p + "self_attn.k_proj.weight"] @ h for h in hs]
  vs = [L[p + "self_attn.v_proj.weight"] @ h for h in hs]
  attn = np.zeros(nh * D)
  for head in range(nh):
    kvh = head // (nh // nkv)
    qh = rot(q[head * D : (head + 1) * D], T - 1)
    scores = [float(qh @ rot(ks[t][kvh * D : (kvh + 1) * D], t)) / math.sqrt(D) for t in range(T)]
    m = max(scores)
    probs = [math.exp(s - m) for s in scores]
    for t in range(T):
      attn[head * D : (head + 1) * D] += probs[t] / sum(probs) * vs[t][kvh * D : (kvh + 1) * D]
  x = xs[-1] + L[p + "self_attn.o_proj.weight"] @ attn
  h = norm(x, L[p + "post_attention_layernorm.weight"])
  g, u = L[p + "mlp.gate_proj.weight"] @ h, L[p + "mlp.up_proj.weight"] @ h
  x = x + L[p + "mlp.down_proj.weight"] @ np.array([g[j] / (1 + math.exp(-g[j])) * u[j] for j in range(len(g))])
  expected = L["lm_head.weight"] @ norm(x, L["model.norm.weight"])
  np.testing.assert_allclose(reference_logits(w, cfg, toks)[-1], expected, rtol=1e-5, atol=1e-5)
