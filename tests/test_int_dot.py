"""Integer dot products (kernels/int_dot.py): activations quantized per row to int8 blocks of 32 with a float scale,
codes x activations summed in int32 per block by vpdpbusd. Checked against a NumPy reference that quantizes the
activations the same way (equal up to float32 sums), and against the float kernels on the same weights: per block of
32 the activation rounding moves the sum by at most (scale / 2) x sum |w| (scale = max |x| / 127), so the whole dot
product by at most the sum of that over the blocks."""

import numpy as np
import pytest
from tinygrad import Tensor, dtypes
from tinyvllm_core import SamplingParams
from tinyvllm_core.kernels import int_dot
from tinyvllm_core.kernels.linear import gather_rows, linear, to_panels

pytestmark = pytest.mark.skipif(
  "not int_dot.available()", reason="int kernels: tinygrad's CPU device on an x86 CPU with VNNI"
)


def numpy_quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """llama.cpp's Q8 activations: per 32, scale = max |x| / 127, codes = round(x / scale), halves away from zero."""
  blocks = x.reshape(len(x), -1, 32)
  scale = np.abs(blocks).max(-1) / 127
  v = blocks / np.where(scale > 0, scale, 1)[..., None]
  codes = np.trunc(v + np.where(v < 0, -0.5, 0.5))
  return codes.reshape(x.shape).astype(np.int8), scale.astype(np.float32)


def test_quantize_rows_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 96), dtype=np.float32) * np.array([1, 100, 1e-3], np.float32)[:, None]
  x[1, 32:64] = 0  # an all-zero block: scale 0, codes 0
  x[2, 5] = 0.5 / 127 * np.abs(x[2, :32]).max()  # not a tie in float32, but round trips to one code either way
  codes, scale, code_sums = (t.numpy() for t in int_dot.quantize_rows(Tensor(x)))
  want_codes, want_scale = numpy_quantize_rows(x)
  assert np.abs(codes.astype(int) - want_codes).max() <= 1 and (codes != want_codes).mean() < 0.01  # float32 ties
  np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
  np.testing.assert_allclose(code_sums, codes.reshape(3, -1, 32).sum(-1) * scale, rtol=1e-5, atol=1e-6)
  assert np.abs(codes).max() == 127 and not codes[1, 32:64].any()


# (bits, with offsets): Q4_1 / Q4_0 (4-bit codes 0..15, an offset per 32), Q8_0 / int8 (codes -128..127), Q5_1 / Q5_K
# (8-bit codes with an offset)
@pytest.mark.parametrize("bits,offsets", [(4, True), (8, False), (8, True)], ids=["4bit+offset", "8bit", "8bit+offset"])
@pytest.mark.parametrize("M", [1, 3, 8, 130])
def test_int_kernel_matches_numpy_and_the_float_kernel(bits, offsets, M):
  rng = np.random.default_rng(M * 10 + bits)
  N, K = 48, 96
  codes = rng.integers(0, 16, (N, K)).astype(np.uint8) if bits == 4 else rng.integers(-128, 128, (N, K)).astype(np.int8)
  scale = rng.random((N, K // 32), dtype=np.float32).astype(np.float16).astype(np.float32)  # f16 values, as GGUF's
  offset = rng.standard_normal((N, K // 32), dtype=np.float32).astype(np.float16).astype(np.float32)
  offset = offset if offsets else np.zeros_like(scale)
  w = (codes.reshape(N, -1, 32) * scale[..., None] + offset[..., None]).reshape(N, K)
  stored = codes[:, 0::2] | codes[:, 1::2] << 4 if bits == 4 else codes  # as the float kernels read them
  scales = [to_panels(Tensor(a)).realize() for a in ((scale, offset) if offsets else (scale,))]
  q = int_dot.int_panels(stored).realize()
  assert q.shape == (N // 8, K // (8 if bits == 4 else 4), 8, 4)
  x = rng.standard_normal((M, K), dtype=np.float32)
  x[:, 7] *= 30  # an outlier per row: its block's other codes get coarse
  got = linear(Tensor(x), q, *scales).numpy()
  halves = [to_panels(Tensor(a.astype(np.float16))).realize() for a in ((scale, offset) if offsets else (scale,))]
  np.testing.assert_array_equal(linear(Tensor(x), q, *halves).numpy(), got)  # float16 scales: the same values

  x_codes, x_scale = numpy_quantize_rows(x)
  dequantized_x = (x_codes.reshape(M, -1, 32) * x_scale[..., None]).reshape(M, K)
  want = dequantized_x @ w.T  # the int kernel is exactly this, up to float32 sums
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

  float_kernel = linear(Tensor(x), to_panels(Tensor(stored)).realize(), *scales).numpy()
  np.testing.assert_allclose(float_kernel, x @ w.T, rtol=1e-4, atol=1e-4 * np.abs(x @ w.T).max())
  bound = (x_scale / 2) @ np.abs(w).reshape(N, -1, 32).sum(-1).T  # per block (scale / 2) x sum |w|, summed
  assert (np.abs(got - float_kernel) <= bound + 1e-4 * np.abs(x @ w.T).max()).all()

  rows = np.array([0, 47, 9, 8], dtype=np.int32)
  gathered = gather_rows(q, Tensor(rows), *scales, dtype=dtypes.float32).numpy()
  np.testing.assert_allclose(gathered, w[rows], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(gather_rows(q, Tensor(rows), *halves, dtype=dtypes.float32).numpy(), gathered)


def test_int_kernel_emits_vpdpbusd(tmp_path):
  """The instruction is the point: the C that tinygrad renders for the int kernel (a CUSTOM statement expression)
  compiles to vpdpbusd (objdump of tinygrad's compiled object)."""
  import shutil
  import subprocess

  from tinygrad.engine.realize import compile_linear
  from tinygrad.uop.ops import Ops

  out = linear(Tensor.empty(1, 64), Tensor.empty(2, 8, 8, 4, dtype=dtypes.uint8), Tensor.empty(2, 2, 8))
  programs = [call.src[0] for call in compile_linear(out.linear_with_vars()[0]).src]
  matmul = next(p for p in programs if p.src[0].arg.name == "linear_1_16_64")
  source, binary = (next(s.arg for s in matmul.src if s.op is op) for op in (Ops.SOURCE, Ops.BINARY))
  assert "__builtin_ia32_vpdpbusd256" in source
  if shutil.which("objdump") is None:
    pytest.skip("objdump is not installed")
  (tmp_path / "kernel.o").write_bytes(binary)
  assembly = subprocess.run(["objdump", "-d", str(tmp_path / "kernel.o")], capture_output=True, text=True).stdout
  assert "vpdpbusd" in assembly


def test_smollm2_with_int_kernels_stays_near_float32_and_answers_paris(smollm2, smollm2_path):
  """SmolLM2's Q4_1 layers and Q8_0 embedding through the int kernels against the float32 engine (the same weights,
  dequantized at load), so the difference is the activations' int8 rounding alone: measured max |logit difference| /
  logit range 1.6e-2 to 3.3e-2 over 8 prompts (this one 2.2e-2; the float kernels on the same blocks: 2e-6). Greedy
  answers part from float32's where that rounding flips a near-tie: 2 of 8 prompts identical over 32 tokens, the
  others from token 0 (a chat prompt whose top two logits are 0.11 apart in float32), 3, 23, 24, 25 and 30."""
  from tinyvllm_core import LLM

  llm = LLM(smollm2_path, device="CPU", dtype="float32", kv_cache_gb=0.05, quantize="gguf")
  weights = llm.engine.runner.model.weights
  assert int_dot.is_int_panels(weights["layers.0.gate_up"]) and int_dot.is_int_panels(weights["lm_head"])
  prompt = smollm2.engine.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
  logits = []
  for engine in (smollm2, llm):
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    logits.append(engine.engine.last_logits()[0])
  assert np.abs(logits[1] - logits[0]).max() / np.ptp(logits[0]) < 0.05 and logits[1].argmax() == logits[0].argmax()
  assert "Paris" in llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0].text


@pytest.mark.parametrize(
  "qtype,qtypes",
  [
    ("Q4_K", {"blk.0.ffn_down.weight": "Q6_K", "blk.1.attn_v.weight": "Q6_K"}),
    ("Q5_K", {}),
    ("Q5_0", {}),
    ("Q4_0", {}),
  ],
  ids=["Q4_K_M", "Q5_K", "Q5_0", "Q4_0"],
)
def test_gguf_types_through_the_int_kernels(tmp_path, qtype, qtypes):
  """Every type with one scale per 32 takes int panels (Q6_K's groups of 16, alone or fused into q/k/v, keep the float
  kernels); logits against the NumPy reference on the file's weights, off by the activations' int8 rounding alone
  (measured max |difference| / max |logit|: Q4_K_M 5.5e-3, Q5_K 1.4e-2, Q5_0 3.2e-2, Q4_0 2.3e-2; bound 5e-2)."""
  import json

  from gguf_writer import write_gguf
  from model_factory import make_checkpoint
  from numpy_ref import reference_logits
  from test_model_logits import _engine_logits

  checkpoint = tmp_path / "llama256"  # K-quants need rows of 256
  make_checkpoint(checkpoint, family="llama", hidden_size=256, intermediate_size=512, num_layers=3, num_heads=4)
  weights = write_gguf(tmp_path / "m.gguf", checkpoint, qtype, qtypes=qtypes)
  prompt = [7, 100, 42, 9, 250, 3, 77, 12]
  engine, got, tokens = _engine_logits(tmp_path / "m.gguf", prompt, num_decode=2, quantize="gguf")
  w = engine.runner.model.weights
  assert int_dot.is_int_panels(w["layers.0.gate_up"]) and int_dot.is_int_panels(w["layers.2.down"])
  assert not int_dot.is_int_panels(w["layers.0.down"]) if qtypes else int_dot.is_int_panels(w["layers.0.down"])
  ref = reference_logits(weights, json.loads((checkpoint / "config.json").read_text()), tokens[:-1])[len(prompt) - 1 :]
  print(qtype, np.abs(got - ref).max() / np.abs(ref).max())
  assert np.abs(got - ref).max() < 5e-2 * np.abs(ref).max()


def test_f16_scales_are_stored_as_float16_and_k_quant_scales_stay_float32(tmp_path, monkeypatch):
  """A one-sequence decode step reads the int panels' codes and their scales: GGUF's Q4_1 / Q8_0 scales and offsets
  are f16 values, so they are stored as float16 (0.0625 byte per weight less each; formats/weights.py,
  _half_if_exact) and the logits are those of the same values in float32. K-quants' scales (d x a 6-bit sub-scale)
  are rarely f16 values: those stay float32."""
  from gguf_writer import write_gguf
  from model_factory import make_checkpoint
  from test_model_logits import _engine_logits
  from tinyvllm_core.formats import weights as weights_module

  checkpoint = tmp_path / "tied"  # K-quants need rows of 256; a tied Q8_0 embedding is also the lm_head
  make_checkpoint(
    checkpoint, family="llama", hidden_size=256, intermediate_size=512, num_heads=4, tie_word_embeddings=True
  )
  write_gguf(tmp_path / "q4_1.gguf", checkpoint, "Q4_1", qtypes={"token_embd.weight": "Q8_0"})
  prompt = [7, 100, 42, 9, 250, 3, 77, 12]
  half_engine, half_logits, tokens = _engine_logits(tmp_path / "q4_1.gguf", prompt, num_decode=3, quantize="gguf")
  w = half_engine.runner.model.weights
  assert int_dot.is_int_panels(w["layers.0.gate_up"]) and int_dot.is_int_panels(w["embed"])
  for name in ("layers.0.gate_up_scale", "layers.0.gate_up_min", "layers.1.down_scale", "embed_scale", "lm_head_scale"):
    assert w[name].dtype == dtypes.float16, name

  monkeypatch.setattr(weights_module, "_half_if_exact", lambda values: values)  # every scale float32
  full_engine, full_logits, full_tokens = _engine_logits(tmp_path / "q4_1.gguf", prompt, num_decode=3, quantize="gguf")
  assert full_engine.runner.model.weights["layers.0.gate_up_scale"].dtype == dtypes.float32
  assert tokens == full_tokens
  np.testing.assert_array_equal(half_logits, full_logits)  # the same float32 values in the same arithmetic
  monkeypatch.undo()

  write_gguf(tmp_path / "q4_k.gguf", checkpoint, "Q4_K")
  w = _engine_logits(tmp_path / "q4_k.gguf", prompt, num_decode=0, quantize="gguf")[0].runner.model.weights
  assert int_dot.is_int_panels(w["layers.0.gate_up"])
  for name in ("layers.0.gate_up_scale", "layers.0.gate_up_min"):
    values = w[name].numpy()
    assert values.dtype == np.float32 and not np.array_equal(values.astype(np.float16).astype(np.float32), values)
