"""GGUF Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K blocks kept packed and multiplied in the matmul kernels (like Q4_0 / Q4_1 /
Q8_0), against the gguf package's reference dequantizer; other types (Q2_K, Q3_K...) load through it."""

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from gguf_writer import write_gguf
from model_factory import make_checkpoint
from numpy_ref import reference_logits
from test_model_logits import _engine_logits
from tinygrad import Tensor, dtypes
from tinyvllm_core import LLMEngine
from tinyvllm_core.formats import load_model_files
from tinyvllm_core.formats.gguf_blocks import GGUF_BLOCKS, GGUF_TYPE_NAMES, dequantize
from tinyvllm_core.formats.weights import MATMUL_WEIGHTS, _gguf_block_tensors
from tinyvllm_core.kernels.linear import gather_rows, linear, to_panels


@pytest.fixture(autouse=True)
def float_kernels(monkeypatch):
  """These tests check the kernels that dequantize the blocks, to float32 rounding; on a CPU with VNNI the matmuls
  would take int8 activations (kernels/int_dot.py, checked in tests/test_int_dot.py)."""
  monkeypatch.setenv("TINYVLLM_INT_DOT", "0")


def random_blocks(kind: int, rows: int, num_blocks: int, seed: int) -> np.ndarray:
  """Valid blocks of any type: random bytes, with finite f16 scales."""
  rng = np.random.default_rng(seed)
  dtype = GGUF_BLOCKS[kind]
  blocks = rng.integers(0, 256, (rows, num_blocks * dtype.itemsize), dtype=np.uint8).view(dtype).copy()
  for field in ("d", "dmin", "m"):
    if field in dtype.names:
      blocks[field] = rng.uniform(-0.05, 0.05, blocks[field].shape).astype(np.float16)
  return blocks


@pytest.mark.parametrize("kind", list(GGUF_BLOCKS), ids=list(GGUF_TYPE_NAMES.values()))
def test_unpacking_matches_the_gguf_package(kind):
  blocks = random_blocks(kind, 8, 2, seed=kind)
  reference = gguf_quants.dequantize(blocks.view(np.uint8).reshape(8, -1), GGMLQuantizationType(kind))
  np.testing.assert_array_equal(dequantize(blocks), reference)


@pytest.mark.parametrize("kind", [6, 7, 12, 13, 14], ids=["Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("M", [1, 4, 128])  # 128 rows and more: dequantized once per call, then the float kernel
def test_packed_kernels_match_dequantized_weights(kind, M):
  blocks = random_blocks(kind, 24, 2 if kind >= 12 else 16, seed=kind + M)
  weights = dequantize(blocks)
  x = np.random.default_rng(M).standard_normal((M, weights.shape[1]), dtype=np.float32)
  packed = [to_panels(t).realize() for t in _gguf_block_tensors("w", blocks).values()]
  np.testing.assert_allclose(linear(Tensor(x), *packed).numpy(), x @ weights.T, rtol=1e-4, atol=1e-3)
  index = np.array([0, 5, 8, 23], np.int32)
  rows = gather_rows(packed[0], Tensor(index), *packed[1:], dtype=dtypes.float32).numpy()
  np.testing.assert_allclose(rows, weights[index], rtol=1e-6)


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
  """K-quants need rows of 256: a tiny Llama with hidden size 256 (3 layers: layers 0 and 2 replay one layer jit
  unless their weights differ in layout)."""
  path = tmp_path_factory.mktemp("wide") / "llama256"
  shape = dict(hidden_size=256, intermediate_size=512, num_layers=3, num_heads=4, num_kv_heads=2)
  make_checkpoint(path, family="llama", **shape)
  return path


# llama.cpp's mix: some layers' ffn_down / attn_v in Q6_K, the others' Q4_K (layer 0 and 2 differ)
Q4_K_M = {"blk.0.ffn_down.weight": "Q6_K", "blk.1.attn_v.weight": "Q6_K", "token_embd.weight": "Q6_K"}


@pytest.mark.parametrize(
  "qtype,qtypes", [("Q4_K", Q4_K_M), ("Q5_K", {}), ("Q5_0", {"output.weight": "Q5_1"})], ids=["Q4_K_M", "Q5_K", "Q5"]
)
def test_k_quant_files_run_packed_and_match_reference(wide_checkpoint, tmp_path, qtype, qtypes):
  config = json.loads((wide_checkpoint / "config.json").read_text())
  weights = write_gguf(tmp_path / "m.gguf", wide_checkpoint, qtype, qtypes=qtypes)
  files = load_model_files(tmp_path / "m.gguf", "CPU")
  assert all(files.weights[name].dtype.names is not None for name in ("layers.0.qkv", "layers.1.down", "lm_head"))
  prompt = [7, 100, 42, 9, 250, 3, 77, 12]
  engine, got, tokens = _engine_logits(tmp_path / "m.gguf", prompt, num_decode=2, quantize="gguf")
  matrices = {name: w for name, w in engine.runner.model.weights.items() if name.split(".")[-1] in MATMUL_WEIGHTS}
  assert all(w.dtype in (dtypes.int8, dtypes.uint8) for w in matrices.values())  # no float copy of any matmul weight
  ref = reference_logits(weights, config, tokens[:-1])[len(prompt) - 1 :]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K"])
def test_other_types_load_dequantized_with_a_note(wide_checkpoint, tmp_path, qtype):
  config = json.loads((wide_checkpoint / "config.json").read_text())
  weights = write_gguf(tmp_path / "m.gguf", wide_checkpoint, qtype)
  engine = LLMEngine(tmp_path / "m.gguf", device="CPU", num_blocks=32, block_size=4)
  matrices = 7 * config["num_hidden_layers"] + 2  # q k v o gate up down per layer, token_embd, output
  assert engine.files.notes[0] == f"m.gguf: dequantized to float32 at load: {matrices} {qtype} tensors"
  prompt = [7, 100, 42, 9, 250, 3]
  _, got, tokens = _engine_logits(tmp_path / "m.gguf", prompt, num_decode=1)
  ref = reference_logits(weights, config, tokens[:-1])[len(prompt) - 1 :]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_a_split_file_loads_from_its_parts(wide_checkpoint, tmp_path):
  """NAME-00001-of-00002.gguf + NAME-00002-of-00002.gguf (llama.cpp's gguf-split): the tensors of both parts."""
  from gguf import GGML_QUANT_SIZES
  from gguf_writer import ARRAY, STRING, UINT32, write_gguf_file
  from tinyvllm_core.formats import read_gguf_header

  write_gguf(whole := tmp_path / "whole.gguf", wide_checkpoint, "Q4_K")
  kv, infos = read_gguf_header(whole)
  data = whole.read_bytes()

  def raw(t):
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
    return data[t.offset : t.offset + int(np.prod(t.shape)) // block * size]

  tensors = [(t.name, tuple(reversed(t.shape)), t.ggml_type, raw(t)) for t in infos]
  types = {str: STRING, int: UINT32}
  meta = {k: (types[type(v)], v) for k, v in kv.items() if type(v) in types}
  meta |= {k: (ARRAY, (STRING, v)) for k, v in kv.items() if k == "tokenizer.ggml.tokens"}
  meta |= {"tokenizer.ggml.merges": (ARRAY, (STRING, kv["tokenizer.ggml.merges"]))}
  meta |= {k: (ARRAY, (5, v)) for k, v in kv.items() if k == "tokenizer.ggml.token_type"}
  meta |= {k: (6, v) for k, v in kv.items() if isinstance(v, float)}
  half = len(tensors) // 2
  write_gguf_file(tmp_path / "m-00001-of-00002.gguf", meta, tensors[:half])
  write_gguf_file(tmp_path / "m-00002-of-00002.gguf", {}, tensors[half:])
  prompt = [7, 100, 42, 9]
  _, whole_logits, _ = _engine_logits(whole, prompt, num_decode=1, quantize="gguf")
  _, split_logits, _ = _engine_logits(tmp_path / "m-00001-of-00002.gguf", prompt, num_decode=1, quantize="gguf")
  np.testing.assert_array_equal(split_logits, whole_logits)
  (tmp_path / "m-00002-of-00002.gguf").unlink()
  with pytest.raises(Exception, match="m-00002-of-00002.gguf of this split GGUF file is missing"):
    LLMEngine(tmp_path / "m-00001-of-00002.gguf", device="CPU", num_blocks=16)


def test_a_gguf_file_keeps_its_quantization_by_default(wide_checkpoint, tmp_path):
  """As llama.cpp and ollama run it; quantize=None (--quantize none) dequantizes, and a tiny KV budget that caps the
  context says so in the engine's notes."""
  write_gguf(tmp_path / "m.gguf", wide_checkpoint, "Q4_K")
  default = LLMEngine(tmp_path / "m.gguf", device="CPU", num_blocks=8, block_size=4)
  assert default.quantize == "gguf" and default.runner.model.weights["layers.0.qkv"].dtype == dtypes.uint8
  assert default.files.notes == ["context capped at 28 tokens by the KV cache budget (not 1024)"]
  dense = LLMEngine(tmp_path / "m.gguf", device="CPU", num_blocks=32, quantize=None)
  assert dense.quantize is None and dense.runner.model.weights["layers.0.qkv"].dtype == dtypes.float32
  assert LLMEngine(wide_checkpoint, device="CPU", num_blocks=32).quantize is None  # safetensors: the model's values
