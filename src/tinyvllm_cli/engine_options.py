"""Engine settings that several commands expose the same way: one Typer option alias and help text per setting
(chat, serve-lite, bench), and the `--dtype` checks.

Checked here, before any model loads, so a bad value is one `error:` line (typer's own choice check prints a
multi-line box); the engine's EngineConfig checks it again. tinygrad is imported only to probe an explicit
dtype, so `tinyvllm --help` stays fast."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, BinaryIO, Optional

import typer

from tinyvllm_cli.ui import one_line

DTYPES = ("auto", "float32", "float16", "bfloat16")
DTYPE_METAVAR = "DTYPE"
DTYPE_HELP = (
  "Dtype of the weights, activations and KV cache: auto (float32 on CPU, float16 elsewhere), float32, float16 or "
  "bfloat16. float16 halves weight and KV memory; on CPU float32 is fastest (tinygrad's clang backend computes "
  "float16 through conversions) and bfloat16 may not compile on every CPU."
)
QUANTIZE_HELP = (
  "Weights: gguf (the default for a GGUF file, as llama.cpp and ollama run it: its own Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/"
  "Q5_K/Q6_K blocks, multiplied as stored), none (the model's values; a GGUF dequantized) or int8 (matmul weights as "
  "int8 with one scale per 32, about 1/4 of float32 memory)."
)
BEAM_HELP = (
  "Search kernel optimizations (tinygrad BEAM) of this width when a batch shape is first captured; "
  "slow once, cached on disk (0 = off)."
)
MODEL_HELP = "Repo id, model folder or .gguf file (default: the last pulled model, else the embedded SmolLM2)."
DEVICE_HELP = (
  "tinygrad device: CPU, METAL, CUDA, AMD, CL, ... as DEV writes it (CPU:LLVM a renderer, PYTHON::sm_80 an arch, "
  "CUDA:1 the second GPU); `tinyvllm devices` lists those present (default: DEV, else a GPU, else CPU)."
)
KV_CACHE_GB_HELP = "Memory for the paged KV cache, in GiB."
SPECULATIVE_HELP = (
  "Speculative decoding with prompt lookup: up to this many draft tokens per step, copied from where the last tokens "
  "occurred before in the prompt or reply and verified in one step (greedy output unchanged; 0 = off)."
)
MAX_MODEL_LEN_HELP = "Context length cap (default: the model's)."
QUANTIZE_LIST_HELP = QUANTIZE_HELP + " Repeat to compare, e.g. -q none -q gguf."

# Typer option aliases shared by chat, serve-lite and bench: one name, one help text.
ModelOption = Annotated[Optional[str], typer.Option("--model", "-m", show_default=False, help=MODEL_HELP)]
DeviceOption = Annotated[Optional[str], typer.Option("--device", "-d", show_default=False, help=DEVICE_HELP)]
QuantizeOption = Annotated[Optional[str], typer.Option("--quantize", "-q", show_default=False, help=QUANTIZE_HELP)]
QuantizeListOption = Annotated[
  Optional[list[str]], typer.Option("--quantize", "-q", show_default=False, help=QUANTIZE_LIST_HELP)
]
DtypeOption = Annotated[str, typer.Option("--dtype", metavar=DTYPE_METAVAR, help=DTYPE_HELP)]
BeamOption = Annotated[int, typer.Option("--beam", min=0, help=BEAM_HELP)]
SpeculativeOption = Annotated[int, typer.Option("--num-speculative-tokens", min=0, help=SPECULATIVE_HELP)]
KvCacheGbOption = Annotated[float, typer.Option("--kv-cache-gb", min=0.001, help=KV_CACHE_GB_HELP)]
# chat leaves the KV budget to the engine's default unless asked
OptionalKvCacheGbOption = Annotated[
  Optional[float], typer.Option("--kv-cache-gb", min=0.001, show_default=False, help=KV_CACHE_GB_HELP)
]
MaxModelLenOption = Annotated[
  Optional[int], typer.Option("--max-model-len", min=2, show_default=False, help=MAX_MODEL_LEN_HELP)
]


def check_dtype(value: str) -> str:
  """`value` if it is one of DTYPES, else ValueError with a one-line message naming the option."""
  if value not in DTYPES:
    raise ValueError(f"--dtype {value!r}: choose {', '.join(DTYPES[:-1])} or {DTYPES[-1]}")
  return value


def quantize_setting(value: str | None) -> str | None:
  """The engine's `quantize` for a --quantize value: unset is auto (a GGUF's own blocks), "none" the model's values
  (a GGUF dequantized)."""
  if value is None:
    return "auto"
  return None if value == "none" else value


def check_dtype_compiles(dtype: str, device: str | None) -> None:
  """Store and load a few values in an explicit half dtype on `device` (None: the engine's default), so one the
  backend cannot compile (bfloat16 on a CPU whose clang target lacks __bf16) is one ValueError line now instead of a
  compiler traceback while the model loads. The compiler's own messages are kept off the terminal.
  Run it from the main thread before other threads write to stderr (fd 2 is redirected meanwhile)."""
  if dtype in ("auto", "float32"):
    return
  from tinygrad import Tensor, dtypes
  from tinyvllm_core import resolve_device  # ConfigError (a ValueError) for a device that is not there

  dev = resolve_device(device)
  expected = [1.0, 2.0, 3.0, 4.0]
  with tempfile.TemporaryFile() as log:
    try:
      with _stderr_to(log):
        stored = Tensor(expected).cast(getattr(dtypes, dtype)).contiguous().realize()
        values = stored.cast(dtypes.float32).tolist()
      if values == expected:
        return
      reason = f"it computed {values} for [1, 2, 3, 4]"
    except Exception as e:  # the compiler's failure (CalledProcessError for clang), or the runtime's
      log.seek(0)
      found = re.search(r"error: (.+)", log.read().decode(errors="replace"))
      reason = found.group(1).strip() if found else f"{type(e).__name__}: {one_line(e)}"
  fallback = "float32 or float16" if dtype == "bfloat16" else "float32"
  raise ValueError(f"--dtype {dtype} does not work on {dev} here ({reason[:200]}); use {fallback} (or auto)")


@contextmanager
def _stderr_to(file: BinaryIO) -> Iterator[None]:
  """Point file descriptor 2 (where a compiler subprocess writes) at `file` for the duration."""
  sys.stderr.flush()
  saved = os.dup(2)
  os.dup2(file.fileno(), 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
