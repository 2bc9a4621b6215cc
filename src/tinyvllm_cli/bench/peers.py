"""The peers `tinyvllm bench throughput --compare` runs on the same workload: vLLM and nano-vLLM (as in nano-vllm's
bench.py), transformers (batched `generate`) and llama.cpp (one sequence at a time, on the same GGUF file)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tinyvllm_cli.bench.common import SHIPPED_ALIASES, TOY, BenchModel, hf_config_from, now, progress_bar
from tinyvllm_cli.bench.common import shipped_configs, version
from tinyvllm_cli.bench.throughput import BackendOptions, BackendResult, Workload, run_tinyvllm

PACKAGES = {  # backend -> (what to pip install, the modules it imports)
  "vllm": ("vllm", ["vllm"]),
  "nanovllm": ("nano-vllm", ["nanovllm"]),
  "transformers": ("transformers torch", ["transformers", "torch"]),
  "llamacpp": ("llama-cpp-python", ["llama_cpp"]),
}
LLAMA_FTYPES = {  # general.file_type
  **{0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M"},
  **{13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"},
}


class BackendUnavailable(Exception):
  """This backend cannot run here; the message says why in one line."""


def run_backend(name: str, model: BenchModel, device: str, workload: Workload, opts: BackendOptions) -> BackendResult:
  if name == "tinyvllm":
    return run_tinyvllm(model, device, workload, opts)
  if name == "llamacpp":
    check_gguf(model)  # first: installing llama-cpp-python would not help
  pip_names, modules = PACKAGES[name]
  if any(importlib.util.find_spec(module) is None for module in modules):
    raise BackendUnavailable(f"not installed (pip install {pip_names})")
  runner = {"vllm": run_vllm, "nanovllm": run_nanovllm, "transformers": run_transformers, "llamacpp": run_llamacpp}
  return runner[name](model, device, workload, opts)


def counted(name: str, workload: Workload, gen: list[int], duration: float) -> BackendResult:
  requests = [{"prompt_tokens": len(p), "output_tokens": g} for p, g in zip(workload.prompts, gen)]
  info = {"version": version(PACKAGES[name][0])}
  return BackendResult(name, len(gen), workload.input_tokens, sum(gen), duration, requests, info)


@contextmanager
def config_folder(model: BenchModel) -> Iterator[tuple[Path, str]]:
  """A temporary folder holding the config.json a peer builds a random-weight model from, and where it came from."""
  repo = SHIPPED_ALIASES.get(model.name)
  if model.hf_config is not None:
    config = model.hf_config
    source = "its config.json"
  elif repo in shipped_configs():
    config = json.loads(shipped_configs()[repo].read_text())
    source = f"the shipped {repo} config.json"
  else:
    config = hf_config_from(model.model_config())
    source = "the GGUF's shapes"
  with tempfile.TemporaryDirectory(prefix="tinyvllm-bench-") as tmp:
    Path(tmp, "config.json").write_text(json.dumps(config))
    yield Path(tmp), source


def run_vllm(model: BenchModel, device: str, workload: Workload, opts: BackendOptions) -> BackendResult:
  from vllm import LLM, SamplingParams

  dummy = model.random_weights
  if model.path is not None and model.path.suffix == ".gguf" and not dummy:
    raise BackendUnavailable("needs a Hugging Face model folder (or --random-weights), not a GGUF file")
  with config_folder(model) as (folder, _):
    path = folder if dummy or model.path is None else model.path
    load_format = "dummy" if dummy else "auto"
    llm = LLM(
      model=str(path),
      max_model_len=workload.max_len(),
      load_format=load_format,
      skip_tokenizer_init=dummy,
      seed=opts.seed,
    )
    params = [
      SamplingParams(temperature=workload.temperature, ignore_eos=True, max_tokens=n, detokenize=not dummy)
      for n in workload.output_lens
    ]
    warmup = SamplingParams(max_tokens=16, detokenize=not dummy)
    llm.generate([{"prompt_token_ids": workload.prompts[0][:8]}], warmup, use_tqdm=False)
    t0 = now()
    outs = llm.generate([{"prompt_token_ids": p} for p in workload.prompts], params, use_tqdm=False)
    duration = now() - t0
  return counted("vllm", workload, [len(o.outputs[0].token_ids) for o in outs], duration)


def run_nanovllm(model: BenchModel, device: str, workload: Workload, opts: BackendOptions) -> BackendResult:
  from nanovllm import LLM, SamplingParams

  if model.random_weights or model.path is None or not model.path.is_dir():
    raise BackendUnavailable("loads real weights from a Hugging Face model folder; not a GGUF file or --random-weights")
  llm = LLM(str(model.path), enforce_eager=False, max_model_len=max(4096, workload.max_len()))
  params = [
    SamplingParams(temperature=workload.temperature, ignore_eos=True, max_tokens=n) for n in workload.output_lens
  ]
  llm.generate(["Benchmark: "], SamplingParams())
  no_tqdm = {"use_tqdm": False} if "use_tqdm" in inspect.signature(llm.generate).parameters else {}
  t0 = now()
  outs = llm.generate(workload.prompts, params, **no_tqdm)
  duration = now() - t0
  return counted("nanovllm", workload, [len(o["token_ids"]) for o in outs], duration)


def run_transformers(model: BenchModel, device: str, workload: Workload, opts: BackendOptions) -> BackendResult:
  """Requests sorted by output length in static batches of `transformers_batch_size`, left-padded, sampled, EOS
  ignored; a batch decodes until its longest request is done, and only each request's own max_tokens count."""
  import torch

  torch.manual_seed(opts.seed)
  if opts.torch_threads:
    torch.set_num_threads(opts.torch_threads)
  hf, torch_device, notes = transformers_model(model, device)
  n = len(workload.prompts)
  bs = opts.transformers_batch_size
  order = sorted(range(n), key=lambda i: (workload.output_lens[i], len(workload.prompts[i])))
  batches = [order[i : i + bs] for i in range(0, n, bs)]
  hf_generate(hf, torch_device, [workload.prompts[0][:8]], [16], workload.temperature, lambda k: None)  # warm-up
  requests = [{} for _ in range(n)]
  with progress_bar(f"transformers ({model.name}, {torch_device})", workload.gen_tokens) as advance:
    t0 = now()
    for batch in batches:
      lens = [workload.output_lens[i] for i in batch]
      start = now() - t0
      ticks = hf_generate(hf, torch_device, [workload.prompts[i] for i in batch], lens, workload.temperature, advance)
      end = now() - t0
      for i, m in zip(batch, lens):  # a request finishes at the step that produced its own last counted token
        timing = {"prompt_tokens": len(workload.prompts[i]), "output_tokens": m, "arrival": start}
        requests[i] = timing | {"first_token": ticks[0] - t0, "finish": ticks[m - 1] - t0, "batch_finish": end}
    duration = now() - t0
  computed = sum(len(b) * max(workload.output_lens[i] for i in b) for b in batches)
  threads = torch.get_num_threads()
  notes.append(f"{threads} torch CPU thread(s); tinyvllm splits its big CPU kernels over the same cores")
  notes.append(
    f"static batches of {bs} requests (sorted by output length, left-padded); {workload.gen_tokens:,} of the "
    f"{computed:,} tokens decoded were within each request's own max_tokens and are counted"
  )
  info = {
    "version": version("transformers"),
    "torch": version("torch"),
    "torch_device": torch_device,
    "torch_threads": threads,
    "batch_size": bs,
    "computed_gen_tokens": computed,
    "notes": notes,
  }
  return BackendResult("transformers", n, workload.input_tokens, workload.gen_tokens, duration, requests, info)


def transformers_model(model: BenchModel, device: str) -> tuple[object, str, list[str]]:
  import torch
  from transformers import AutoConfig, AutoModelForCausalLM

  torch_device = "cpu"
  if device in ("CUDA", "NV") and torch.cuda.is_available():
    torch_device = "cuda"
  elif device == "METAL" and torch.backends.mps.is_available():
    torch_device = "mps"
  dtype = torch.float32 if torch_device == "cpu" else torch.float16
  dtype_name = str(dtype).replace("torch.", "")
  if not model.random_weights and model.path is not None and model.path.is_dir():
    hf = AutoModelForCausalLM.from_pretrained(str(model.path), dtype=dtype)
    notes = [f"real weights, {dtype_name}"]
  else:
    with config_folder(model) as (folder, source):
      hf_config = AutoConfig.from_pretrained(str(folder))
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    why = "" if model.random_weights else " (transformers cannot load this model's weights here)"
    notes = [f"random weights built from {source}{why}, {dtype_name}"]
  hf.generation_config.eos_token_id = None  # ignore_eos: a None in the call's GenerationConfig falls back to this
  return hf.to(torch_device).eval(), torch_device, notes


def hf_generate(hf, torch_device: str, prompts: list[list[int]], lens: list[int], temperature: float, advance) -> list:
  """One left-padded generate call of max(lens) steps; the time of each step (advance: the tokens counted)."""
  import torch
  from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

  ticks = []

  class Tick(StoppingCriteria):
    """Called once per decode step; never stops generation."""

    def __call__(self, input_ids, scores, **kwargs):
      ticks.append(now())
      advance(sum(1 for m in lens if m >= len(ticks)))
      return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

  width = max(map(len, prompts))
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for row, p in enumerate(prompts):
    ids[row, width - len(p) :] = torch.tensor(p)
    mask[row, width - len(p) :] = 1
  sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
  config = GenerationConfig(**sampling, max_new_tokens=max(lens), pad_token_id=0, eos_token_id=None)
  with torch.inference_mode():
    hf.generate(
      input_ids=ids.to(torch_device),
      attention_mask=mask.to(torch_device),
      generation_config=config,
      stopping_criteria=StoppingCriteriaList([Tick()]),
    )
  return ticks


def check_gguf(model: BenchModel) -> None:
  """llama.cpp loads the model's own GGUF file; anything else is one line of why not."""
  if model.random_weights:
    what = "the toy model (random weights)" if model.name == TOY else "random weights (--random-weights)"
  elif model.path is None:
    what = "not a file"
  elif model.path.is_dir():
    what = f"a Hugging Face model folder ({model.path})"
  elif model.path.suffix != ".gguf":
    what = f"not a .gguf file ({model.path})"
  else:
    return
  raise BackendUnavailable(f"llama.cpp runs GGUF files; this model is {what}")


def run_llamacpp(model: BenchModel, device: str, workload: Workload, opts: BackendOptions) -> BackendResult:
  """One request after another (a Llama holds one sequence), each from an empty KV cache, sampled until its own
  max_tokens (`Llama.generate` never stops at EOS)."""
  import ctypes

  import llama_cpp

  threads = os.cpu_count() or 1
  gpu = device.split(":")[0] != "CPU" and bool(llama_cpp.llama_supports_gpu_offload())
  gpu_layers = -1 if gpu else 0
  llm = llama_cpp.Llama(
    model_path=str(model.path),
    n_ctx=max(workload.max_len(), 64),
    n_batch=512,
    n_threads=threads,
    n_threads_batch=threads,
    n_gpu_layers=gpu_layers,
    seed=opts.seed,
    verbose=False,
  )
  llm.set_seed(opts.seed)  # Llama(seed=0) means "random seed"; set_seed keeps 0
  try:
    buf = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(llm.model, buf, len(buf))
    desc = buf.value.decode("utf-8", "replace")
    file_type = llm.metadata.get("general.file_type")
    ftype = LLAMA_FTYPES.get(int(file_type), f"file type {file_type}") if file_type else desc.split(" ")[-1]
    sizes = {"n_ctx": llm.n_ctx(), "n_batch": llm.n_batch}  # as llama.cpp took them (n_batch is capped at n_ctx)
    llama_request(llm, workload.other_tokens().prompts[0][:8], 16, workload.temperature, 0.0, lambda n=1: None)
    with progress_bar(f"llamacpp ({model.name}, {'GPU' if gpu else 'CPU'})", workload.gen_tokens) as advance:
      t0 = now()
      requests = [
        llama_request(llm, p, n, workload.temperature, t0, advance)
        for p, n in zip(workload.prompts, workload.output_lens)
      ]
      duration = now() - t0
  finally:
    llm.close()
  gen = sum(r["output_tokens"] for r in requests)
  prefill_s = sum(r["first_token"] - r["arrival"] for r in requests)
  decode_s = sum(r["finish"] - r["first_token"] for r in requests)
  decoded = gen - len(requests)  # the first token of each request comes with its prefill
  where = "all layers offloaded to the GPU" if gpu else f"on the CPU with {threads} thread(s)"
  speeds = f"prefill {workload.input_tokens / max(prefill_s, 1e-9):,.1f} tok/s"
  speeds += f", decode {decoded / max(decode_s, 1e-9):,.1f} tok/s"
  notes = [
    "requests run one at a time: llama-cpp-python's Llama serves one sequence (no batching), from an empty KV cache",
    f"reads the GGUF's own quantized weights ({ftype}) with llama.cpp's own kernels, {where}",
    speeds,
  ]
  info = {
    "version": version("llama_cpp_python") or getattr(llama_cpp, "__version__", None),
    "n_threads": threads,
    "n_threads_batch": threads,
    "n_gpu_layers": gpu_layers,
    **sizes,
    "model_desc": desc,
    "weights": ftype,
    "seed": opts.seed,
    "prefill_s": prefill_s,
    "decode_s": decode_s,
    "notes": notes,
  }
  return BackendResult("llamacpp", len(requests), workload.input_tokens, gen, duration, requests, info)


def llama_request(llm, prompt: list[int], max_tokens: int, temperature: float, t0: float, advance) -> dict:
  """One request; only its own max_tokens are drawn from the generator (EOS does not stop it)."""
  llm.reset()  # no prefix reuse from the previous request
  arrival = now() - t0
  first = None
  count = 0
  sampling = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "temp": temperature, "repeat_penalty": 1.0}
  tokens = llm.generate(prompt, reset=True, **sampling)
  try:
    for _ in tokens:
      count += 1
      first = first or now() - t0
      advance(1)
      if count == max_tokens:
        break
  finally:
    tokens.close()
  finish = now() - t0
  return {
    "prompt_tokens": len(prompt),
    "output_tokens": count,
    "arrival": arrival,
    "first_token": first,
    "finish": finish,
  }
