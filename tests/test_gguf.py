"""The GGUF loading path (formats.load_gguf / gguf_tokenizer / unpermute_rope) against the NumPy
reference.

Files come from tests/gguf_writer.py, an independent llama.cpp-style converter + GGML quantizer; the reference runs on
the
dequantized weights the file really holds, so the engine must match it as tightly as for a float32 HF checkpoint."""

import json
import numpy as np
import pytest
from tinygrad import dtypes
from gguf_writer import FLOAT32, STRING, UINT32, gguf_tensors, permute_rope, quantize, unpermute_rope, write_gguf
from model_factory import SPECIAL_TOKENS
from numpy_ref import reference_logits
from test_model_logits import _engine_logits
from tinyvllm_core import ConfigError, LLMEngine
from tinyvllm_core.formats import load_gguf, read_hf_config
from tinyvllm_core.formats.gguf import GGUF_NAMES
from tinyvllm_core.formats.gguf_blocks import Unpacked
from tinyvllm_core.formats.gguf import unpermute_rope as core_unpermute_rope
from tinyvllm_core.formats.tokenizer import gguf_tokenizer


@pytest.fixture(autouse=True)
def float_kernels(monkeypatch):
  """These tests check the kernels that dequantize the blocks, to float32 rounding; on a CPU with VNNI the matmuls
  would take int8 activations (kernels/int_dot.py, checked in tests/test_int_dot.py)."""
  monkeypatch.setenv("TINYVLLM_INT_DOT", "0")


ENGINE_KW = dict(device="CPU", num_blocks=32, block_size=4)
TEXTS = [
  "Hello world, the capital of France is Paris.",
  "Numbers like 1234, 42 and 3.14159!\n\nNew   lines\tand tabs  ",
  "héllo wörld — ünïcode ✓ 日本語",
  "don't STOP, we'll see'",
  "  leading spaces and trailing  ",
]


def _config(d):
  return json.loads((d / "config.json").read_text())


# ---- the writer itself, cross-checked with tinygrad's decoder


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantizer_error_bounds(qtype):
  """Independent sanity check of the block formulas: the round-trip error stays within the block's step size."""
  x = (
    np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    * np.linspace(0.01, 10, 8, dtype=np.float32)[:, None]
  )
  x[0, :32] = 0.0  # an all-zero block must survive
  raw, deq = quantize(x, qtype)
  b, dq = x.reshape(-1, 32), deq.reshape(-1, 32)
  assert len(raw) == b.shape[0] * {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype] and np.all(dq[0] == 0)
  err = np.abs(b - dq).max(-1)
  if qtype == "Q8_0":
    bound = 0.6 * np.abs(b).max(-1) / 127
  elif qtype == "Q4_0":
    bound = 1.05 * np.abs(b).max(-1) / 8  # the extreme opposite to the max clamps at 15 (error up to one step)
  else:
    bound = 0.55 * (b.max(-1) - b.min(-1)) / 15 + np.abs(b.min(-1)) * 2**-10
  assert np.all(err <= bound + 1e-12), (err, bound)


@pytest.mark.parametrize(
  "family,qtype", [("llama", "Q8_0"), ("llama", "Q4_0"), ("qwen3", "Q4_1"), ("qwen2", "F16"), ("qwen3", "F32")]
)
def test_writer_matches_tinygrad_decoder(checkpoints, tmp_path, family, qtype):
  from tinygrad.llm.gguf import gguf_load

  d, orig, config = checkpoints[family]
  deq = write_gguf(tmp_path / "m.gguf", d, qtype)
  assert set(deq) == set(orig)
  kv, sd = gguf_load(tmp_path / "m.gguf")
  expected = gguf_tensors(deq, config)  # llama q/k back in llama.cpp's permuted order
  assert set(sd) == set(expected)
  for name, want in expected.items():
    got = sd[name].numpy()
    assert got.shape == want.shape, name
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6, err_msg=name)  # fp16-level; in practice bit-exact
  assert (
    kv["general.architecture"] == family
    and kv["general.alignment"] == 32
    and kv[f"{family}.block_count"] == config["num_hidden_layers"]
  )
  assert len(kv["tokenizer.ggml.tokens"]) == config["vocab_size"] and kv["tokenizer.ggml.tokens"][301] == "<|im_start|>"


def test_unpermute_rope_inverts_llama_cpp_permutation():
  rng = np.random.default_rng(1)
  for n_heads, head_dim in ((4, 16), (2, 16), (3, 32), (1, 8)):
    w = rng.standard_normal((n_heads * head_dim, 24)).astype(np.float32)
    p = permute_rope(w, n_heads)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(core_unpermute_rope(p, n_heads), w)
    np.testing.assert_array_equal(unpermute_rope(p, n_heads), w)
    # row h*D + 2j + a of the GGUF tensor is HF row h*D + a*D/2 + j (interleaved pairs vs rotate-half)
    h, j, a = n_heads - 1, head_dim // 2 - 1, 1
    np.testing.assert_array_equal(p[h * head_dim + 2 * j + a], w[h * head_dim + a * head_dim // 2 + j])


# ---------------------------------------------------------------- engine logits vs the NumPy reference


@pytest.mark.parametrize(
  "name,qtype",
  [
    ("llama", "Q8_0"),
    ("llama", "Q4_1"),
    ("llama", "Q4_0"),
    ("qwen3", "Q8_0"),
    ("llama", "F16"),
    ("llama_tied_bf16_sharded", "Q8_0"),
    ("qwen2", "Q4_0"),
    ("qwen3_fp16", "F32"),
  ],
)
def test_gguf_logits_match_numpy_reference(checkpoints, tmp_path, device, name, qtype):
  d, _, config = checkpoints[name]
  weights = write_gguf(tmp_path / f"{name}.{qtype}.gguf", d, qtype)
  prompt = [7, 100, 42, 9, 250, 3, 77, 12, 5, 61, 8, 199, 33]
  engine, got, tokens = _engine_logits(
    tmp_path / f"{name}.{qtype}.gguf", prompt, num_decode=3, device=device, dtype="float32"
  )  # same reader as test_model_logits
  want_cfg = read_hf_config(d / "config.json")
  assert engine.model_config.rms_norm_eps == pytest.approx(want_cfg.rms_norm_eps, rel=1e-6)  # stored as float32
  engine.model_config.rms_norm_eps = want_cfg.rms_norm_eps
  assert engine.model_config == want_cfg
  ref = reference_logits(weights, config, tokens[:-1])[len(prompt) - 1 :]
  assert got.shape == ref.shape == (4, config["vocab_size"])
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize(
  "name,qtype",
  [("llama", "Q4_1"), ("llama", "Q4_0"), ("qwen3", "Q8_0"), ("llama_tied_bf16_sharded", "Q4_1"), ("qwen2", "Q4_0")],
)
def test_gguf_blocks_kept_packed_match_numpy_reference(checkpoints, tmp_path, device, name, qtype):
  """quantize="gguf": the matmuls and the embedding read the file's own Q8_0 / Q4_0 / Q4_1 blocks (4-bit codes two per
  byte), dequantized inside the kernels; logits must equal the reference on the weights the file holds, as tightly as
  float32."""
  d, _, config = checkpoints[name]
  weights = write_gguf(tmp_path / f"{name}.{qtype}.gguf", d, qtype)
  prompt = [7, 100, 42, 9, 250, 3, 77, 12, 5, 61, 8, 199, 33]
  path = tmp_path / f"{name}.{qtype}.gguf"
  engine, got, tokens = _engine_logits(path, prompt, num_decode=3, device=device, dtype="float32", quantize="gguf")
  model_weights = engine.runner.model.weights
  assert (
    model_weights["layers.0.gate_up"].dtype == {"Q8_0": dtypes.int8}.get(qtype, dtypes.uint8)
    and "embed_scale" in model_weights
  )
  assert ("layers.0.gate_up_min" in model_weights) == (qtype != "Q8_0")
  ref = reference_logits(weights, config, tokens[:-1])[len(prompt) - 1 :]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_mixed_block_types_in_one_fused_weight(checkpoints, tmp_path, device):
  """A Q4_1 file whose attn_v is Q8_0 (llama.cpp mixes types): the fused q/k/v stays packed as one layout (int8 codes,
  a scale and an offset per group), gate/up as the file's Q4_1 blocks."""
  d, _, config = checkpoints["llama"]
  path = tmp_path / "mixed.gguf"
  weights = write_gguf(path, d, "Q4_1", qtypes={"blk.0.attn_v.weight": "Q8_0"})
  files = load_gguf(path, device)
  assert isinstance(files.weights["layers.0.qkv"], Unpacked)
  assert files.weights["layers.0.gate_up"].dtype.names is not None
  assert files.weights["layers.1.qkv"].dtype.names is not None
  prompt = [7, 100, 42, 9, 250, 3]
  _, got, tokens = _engine_logits(path, prompt, num_decode=2, device=device, dtype="float32", quantize="gguf")
  ref = reference_logits(weights, config, tokens[:-1])[len(prompt) - 1 :]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_gguf_blocks_need_a_gguf_file(checkpoints, tmp_path):
  d = checkpoints["llama"][0]
  with pytest.raises(ConfigError, match="has no GGUF Q8_0/Q4_0/Q4_1 weights to keep"):
    LLMEngine(d, **ENGINE_KW, quantize="gguf")
  write_gguf(tmp_path / "f16.gguf", d, "F16")
  with pytest.raises(ConfigError, match="f16.gguf has no GGUF Q8_0/Q4_0/Q4_1 weights"):
    LLMEngine(tmp_path / "f16.gguf", **ENGINE_KW, quantize="gguf")


def test_gguf_names_cover_converted_files(checkpoints, tmp_path):
  """Every tensor a converted qwen2 / qwen3 file holds is one the loader asks for (nothing silently ignored)."""
  for family, extra in (("qwen2", {"q_bias", "k_bias", "v_bias"}), ("qwen3", {"q_norm", "k_norm"})):
    d, _, config = checkpoints[family]
    names = set(gguf_tensors(write_gguf(tmp_path / f"{family}.gguf", d, "F16"), config))
    keys = {"embed", "norm", "lm_head", "q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm"} | extra
    wanted = {GGUF_NAMES[k].format(i=i) for k in keys for i in range(config["num_hidden_layers"])}
    assert names == wanted


# ---------------------------------------------------------------- tokenizer and chat template


@pytest.fixture(scope="module")
def gguf_engine(checkpoints, tmp_path_factory):
  d = checkpoints["llama"][0]
  path = tmp_path_factory.mktemp("gguf") / "llama.Q8_0.gguf"
  write_gguf(path, d, "Q8_0")
  return LLMEngine(path, **ENGINE_KW), d


def test_gguf_tokenizer_matches_tokenizer_json(gguf_engine):
  from tokenizers import Tokenizer

  engine, d = gguf_engine
  hf = Tokenizer.from_file(str(d / "tokenizer.json"))
  for text in TEXTS:
    ids = engine.encode(text)
    assert ids == hf.encode(text).ids, text
    assert engine.decode(ids) == text
  chat = "<|im_start|>user\nhi there<|im_end|>\n"
  ids = engine.encode(chat, add_special_tokens=False)
  assert ids == hf.encode(chat, add_special_tokens=False).ids and ids[0] == 301 and ids.count(302) == 1
  assert engine.tokenizer.decode(ids, skip_special_tokens=False) == chat and engine.decode(ids) == "user\nhi there\n"
  for i, tok in enumerate(SPECIAL_TOKENS, start=300):
    assert engine.encode(tok, add_special_tokens=False) == [i]
  assert engine.model_config.vocab_size == 384 and engine.eos_token_ids == {302}
  assert engine.files.special_tokens == {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}


def test_gguf_chat_template(gguf_engine):
  from tokenizers import Tokenizer

  engine, d = gguf_engine
  hf = Tokenizer.from_file(str(d / "tokenizer.json"))
  text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  assert engine.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == text
  assert (
    engine.apply_chat_template([{"role": "user", "content": "hi"}]) == hf.encode(text, add_special_tokens=False).ids
  )


# HF pre-tokenizers of the real model families the GGUF `tokenizer.ggml.pre` names stand for (from their
# tokenizer.json files)
_QWEN2_REGEX = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_HF_PRE = {
  "gpt2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
  "qwen2": {
    "type": "Sequence",
    "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": _QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
      {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ],
  },
  "smollm": {
    "type": "Sequence",
    "pretokenizers": [
      {"type": "Digits", "individual_digits": True},
      {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
  },
}


@pytest.mark.parametrize("pre", list(_HF_PRE))
def test_gguf_tokenizer_pre_split(checkpoints, tmp_path, pre):
  from tinygrad.llm.gguf import gguf_load
  from tokenizers import Tokenizer

  d = checkpoints["qwen3"][0]
  write_gguf(tmp_path / "m.gguf", d, "F16", pre=pre)
  kv, _ = gguf_load(tmp_path / "m.gguf")
  assert kv["tokenizer.ggml.pre"] == pre
  tok = gguf_tokenizer(kv, tmp_path / "m.gguf")
  hf = Tokenizer.from_str(json.dumps(json.loads((d / "tokenizer.json").read_text()) | {"pre_tokenizer": _HF_PRE[pre]}))
  for text in TEXTS + ["<|im_start|>assistant\n1 22 333 4444<|im_end|>"]:
    assert tok.encode(text).ids == hf.encode(text).ids, (pre, text)
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


# ---------------------------------------------------------------- bad files


def _config_error(path) -> str:
  with pytest.raises(ConfigError) as e:
    LLMEngine(path, **ENGINE_KW)
  msg = str(e.value)
  assert "\n" not in msg and str(path) in msg, msg
  return msg


@pytest.fixture(scope="module")
def good_gguf(checkpoints, tmp_path_factory):
  path = tmp_path_factory.mktemp("bad") / "good.gguf"
  write_gguf(path, checkpoints["llama"][0], "Q8_0")
  return path


def test_truncated_tensor_data(good_gguf, tmp_path):
  data = good_gguf.read_bytes()
  header_end = data.rfind(b"ffn_down.weight") + 64  # the tensor infos end before this; the data follows
  for cut in (len(data) // 2, len(data) - 100, header_end + (len(data) - header_end) // 3):
    assert header_end < cut < len(data)
    (p := tmp_path / f"cut{cut}.gguf").write_bytes(data[:cut])
    msg = _config_error(p)
    assert "truncated" in msg or "not a valid GGUF" in msg


def test_truncated_header(good_gguf, tmp_path):
  data = good_gguf.read_bytes()
  for cut in (0, 3, 100, data.rfind(b"ffn_down.weight") + 10):
    (p := tmp_path / f"cut{cut}.gguf").write_bytes(data[:cut])
    _config_error(p)


def test_wrong_magic_and_version(good_gguf, tmp_path):
  data = good_gguf.read_bytes()
  (p := tmp_path / "magic.gguf").write_bytes(b"GGUX" + data[4:])
  assert "not a valid GGUF" in _config_error(p)
  (p := tmp_path / "version.gguf").write_bytes(data[:4] + (9).to_bytes(4, "little") + data[8:])
  assert "not a valid GGUF" in _config_error(p)


def test_unsupported_architecture(checkpoints, tmp_path):
  write_gguf(p := tmp_path / "mamba.gguf", checkpoints["llama"][0], "F16", arch="mamba")
  assert "'mamba' is not supported" in _config_error(p)


@pytest.mark.parametrize(
  "key", ["llama.block_count", "llama.embedding_length", "llama.attention.layer_norm_rms_epsilon"]
)
def test_missing_metadata(checkpoints, tmp_path, key):
  write_gguf(p := tmp_path / "m.gguf", checkpoints["llama"][0], "F16", edit_metadata={key: None})
  assert f"'{key}' is missing" in _config_error(p)


def test_unsupported_tokenizer_model(checkpoints, tmp_path):
  write_gguf(
    p := tmp_path / "m.gguf", checkpoints["llama"][0], "F16", edit_metadata={"tokenizer.ggml.model": (STRING, "bert")}
  )
  assert "'bert' is not supported" in _config_error(p)


def test_missing_tokenizer_tokens(checkpoints, tmp_path):
  write_gguf(p := tmp_path / "m.gguf", checkpoints["llama"][0], "F16", edit_metadata={"tokenizer.ggml.tokens": None})
  assert "tokenizer.ggml.tokens" in _config_error(p)


def test_missing_tensor(checkpoints, tmp_path):
  """A tensor the architecture needs (here: a qwen2 bias, by converting qwen3 weights under the qwen2 name) is
  reported."""
  d = checkpoints["qwen3"][0]
  c = _config(d)
  edit = {
    "general.architecture": (STRING, "qwen2"),
    "qwen2.block_count": (UINT32, c["num_hidden_layers"]),
    "qwen2.context_length": (UINT32, 1024),
    "qwen2.embedding_length": (UINT32, c["hidden_size"]),
    "qwen2.feed_forward_length": (UINT32, c["intermediate_size"]),
    "qwen2.attention.head_count": (UINT32, c["num_attention_heads"]),
    "qwen2.attention.head_count_kv": (UINT32, c["num_key_value_heads"]),
    "qwen2.attention.key_length": (UINT32, c["head_dim"]),
    "qwen2.attention.layer_norm_rms_epsilon": (FLOAT32, c["rms_norm_eps"]),
  }
  write_gguf(p := tmp_path / "m.gguf", d, "F16", edit_metadata=edit)
  assert "'blk.0.attn_q.bias' is missing" in _config_error(p)


def test_metadata_that_contradicts_the_weights(checkpoints, tmp_path):
  write_gguf(
    p := tmp_path / "m.gguf", checkpoints["llama"][0], "F16", edit_metadata={"llama.attention.head_count_kv": None}
  )
  assert "do not match" in _config_error(p)
