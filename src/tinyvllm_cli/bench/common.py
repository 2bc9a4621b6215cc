"""What every `tinyvllm bench` preset shares: the model under test (real weights, random weights from a config, or
the seed's toy), running requests through an engine, the machine, the progress bar and the JSON + markdown report."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tinyvllm_cli import ui
from tinyvllm_cli.models import EMBEDDED_ALIAS, ModelNotFoundError, resolve_model

if TYPE_CHECKING:  # the engine is imported lazily: `tinyvllm --help` stays fast
  from tinygrad import Tensor
  from tinyvllm_core import ModelConfig
  from tinyvllm_core.formats import ModelFiles

TOY = "toy"
# the seed's toy model (000): dim=64, n_layers=4, n_heads=4, as a Llama config with a small vocabulary
TOY_CONFIG = {
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "vocab_size": 1024,
  "hidden_size": 64,
  "intermediate_size": 256,
  "num_hidden_layers": 4,
  "num_attention_heads": 4,
  "num_key_value_heads": 4,
  "max_position_embeddings": 2048,
  "rms_norm_eps": 1e-5,
  "rope_theta": 10000.0,
  "tie_word_embeddings": False,
}
SHIPPED_ALIASES = {EMBEDDED_ALIAS: "HuggingFaceTB/SmolLM2-135M-Instruct"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class BenchError(Exception):
  """Bad bench input; the CLI prints it as one line."""


@contextmanager
def one_line_errors() -> Iterator[None]:
  """Expected failures (bad input, a model or device that is not there) as one `error:` line."""
  try:
    yield
  except (BenchError, ValueError) as e:
    ui.fail(e)


# ---- the model under test --------------------------------------------------------------------


@dataclass
class BenchModel:
  """A model to benchmark: real weights from `path` (HF folder or .gguf), or random weights shaped by `hf_config`."""

  name: str
  path: Path | None = None
  hf_config: dict | None = None  # config.json contents; None for a GGUF until it is loaded
  random_weights: bool = False
  _loaded: ModelFiles | None = field(default=None, repr=False)  # a GGUF read early: its config lives in its weights
  _config: ModelConfig | None = field(default=None, repr=False)

  @property
  def name_slug(self) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", self.name.lower()).strip("-")

  @property
  def slug(self) -> str:
    random_suffix = "-random" if self.random_weights and self.name != TOY else ""
    return self.name_slug + random_suffix

  def model_config(self) -> ModelConfig:
    """The engine's ModelConfig (a GGUF is read once here and its weights kept for `files`)."""
    if self._config is not None:
      return self._config
    if self.hf_config is not None:
      self._config = model_config_from_dict(self.hf_config)
    else:
      self._loaded = load_files(self.path, "CPU")
      self._config = self._loaded.config
    return self._config

  def files(self, device: str) -> ModelFiles:
    """ModelFiles for LLMEngine; the engine takes ownership of the weights."""
    from tinyvllm_core.formats import ModelFiles

    if self.random_weights:
      return ModelFiles(config=self.model_config(), weights=random_weights(self.model_config(), device), tokenizer=None)
    loaded, self._loaded = self._loaded, None
    files = loaded or load_files(self.path, device)
    self._config = files.config
    return files

  def describe(self) -> dict:
    config = self.hf_config or (hf_config_from(self.model_config()) if self.path else None)
    path = str(self.path) if self.path else None
    return {"name": self.name, "path": path, "random_weights": self.random_weights, "config": config}


def load_files(path: Path, device: str) -> ModelFiles:
  from tinyvllm_core import ConfigError
  from tinyvllm_core.formats import load_model_files

  try:
    return load_model_files(path, device)
  except ConfigError as e:
    raise BenchError(str(e)) from None


def model_config_from_dict(cfg: dict) -> ModelConfig:
  """read_hf_config reads a file; write the dict to a temp file so the engine's own parser checks it."""
  from tinyvllm_core import ConfigError
  from tinyvllm_core.formats import read_hf_config

  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp, "config.json")
    path.write_text(json.dumps(cfg))
    try:
      return read_hf_config(path)
    except ConfigError as e:
      raise BenchError(str(e).replace(str(path), "config.json")) from None


def hf_config_from(mc: ModelConfig) -> dict:
  """An HF config.json for a ModelConfig (a GGUF's shapes, for backends that build models from configs)."""
  return {
    "architectures": [ARCHITECTURES[mc.family]],
    "model_type": mc.family,
    "vocab_size": mc.vocab_size,
    "hidden_size": mc.hidden_size,
    "intermediate_size": mc.intermediate_size,
    "num_hidden_layers": mc.num_layers,
    "num_attention_heads": mc.num_heads,
    "num_key_value_heads": mc.num_kv_heads,
    "head_dim": mc.head_dim,
    "rms_norm_eps": mc.rms_norm_eps,
    "rope_theta": mc.rope_theta,
    "max_position_embeddings": mc.max_position_embeddings,
    "tie_word_embeddings": mc.tie_word_embeddings,
  }


def shipped_configs() -> dict[str, Path]:
  """The real config.json of a few public models, shipped with the package: repo id -> file."""
  folder = resources.files("tinyvllm_cli") / "configs"
  org = {"Qwen3": "Qwen", "SmolLM2": "HuggingFaceTB", "Llama": "meta-llama"}
  files = [p for p in folder.iterdir() if p.name.endswith(".json")]
  return {f"{org[p.name.split('-')[0]]}/{p.name[:-5]}": Path(str(p)) for p in files}


def read_config(path: Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise BenchError(f"{path}: cannot read config.json ({e})") from None


def resolve_bench_model(name: str | None, random_weights: bool) -> BenchModel:
  """`toy`, a real model (path, pulled repo id, `smollm2`), or with random_weights a config: a shipped repo id,
  a config.json path, a model folder or .gguf whose shapes are used."""
  if name == TOY:
    return BenchModel(TOY, hf_config=dict(TOY_CONFIG), random_weights=True)
  if random_weights:
    return random_model(name or "Qwen/Qwen3-0.6B")
  try:
    path = resolve_model(name)
  except ModelNotFoundError as e:
    hint = "; or add --random-weights to run its real shapes with random weights" if name in shipped_configs() else ""
    raise BenchError(f"{e}{hint}") from None
  hf_config = read_config(path / "config.json") if path.is_dir() else None
  return BenchModel(display_name(name, path), path=path, hf_config=hf_config)


def display_name(name: str | None, path: Path) -> str:
  """A repo id or alias as given (its last part); a path by its folder or file name."""
  if name and not Path(name).expanduser().exists():
    return name.split("/")[-1]
  return path.stem if path.is_file() else path.name


def random_model(name: str) -> BenchModel:
  shipped = shipped_configs()
  repo_id = SHIPPED_ALIASES.get(name, name)
  if repo_id in shipped:
    return BenchModel(repo_id.split("/")[-1], hf_config=read_config(shipped[repo_id]), random_weights=True)
  path = Path(name).expanduser()
  if path.suffix == ".json":
    if not path.is_file():
      raise BenchError(f"{name}: no such config file")
    display = path.parent.name if path.name == "config.json" else path.stem
    return BenchModel(display, hf_config=read_config(path), random_weights=True)
  try:
    path = resolve_model(name)
  except ModelNotFoundError as e:
    choices = ", ".join(sorted(shipped))
    raise BenchError(f"{e}; with --random-weights --model also takes a config.json path or one of: {choices}") from None
  if path.is_dir():
    return BenchModel(display_name(name, path), hf_config=read_config(path / "config.json"), random_weights=True)
  return BenchModel(display_name(name, path), path=path, random_weights=True)


def random_weights(mc: ModelConfig, device: str, std: float = 0.02) -> dict[str, Tensor]:
  """The engine's canonical weights for a ModelConfig, uniform with std 0.02 from the core's counter hash (one
  compiled kernel per shape: tinygrad's rand compiles one per call), built lazily on the device."""
  from tinygrad import Tensor, dtypes
  from tinyvllm_core import hash_uniform

  seeds = iter(range(1, 1 << 30))
  scale = std * math.sqrt(3)

  def w(*shape: int) -> Tensor:
    counters = Tensor.arange(math.prod(shape), dtype=dtypes.uint32).to(device)
    u = hash_uniform(counters, Tensor([next(seeds)], dtype=dtypes.uint32, device=device))
    return ((2 * u - 1) * scale).reshape(shape)

  def ones(n: int) -> Tensor:
    return Tensor.ones(n, device=device).contiguous()

  H, I, hd = mc.hidden_size, mc.intermediate_size, mc.head_dim
  qkv = (mc.num_heads + 2 * mc.num_kv_heads) * hd
  weights = {"embed": w(mc.vocab_size, H), "norm": ones(H)}
  weights["lm_head"] = weights["embed"] if mc.tie_word_embeddings else w(mc.vocab_size, H)
  for i in range(mc.num_layers):
    p = f"layers.{i}."
    weights[p + "qkv"] = w(qkv, H)
    weights[p + "o"] = w(H, mc.num_heads * hd)
    weights[p + "gate_up"] = w(2 * I, H)
    weights[p + "down"] = w(H, I)
    weights[p + "attn_norm"] = ones(H)
    weights[p + "mlp_norm"] = ones(H)
    if mc.qkv_bias:
      weights[p + "qkv_bias"] = Tensor.zeros(qkv, device=device).contiguous()
    if mc.qk_norm:
      weights[p + "q_norm"] = ones(hd)
      weights[p + "k_norm"] = ones(hd)
  return weights


class PromptSource:
  """Distinct random token-id prompts (no two share a block, so the prefix cache never helps)."""

  def __init__(self, vocab_size: int, length: int, seed: int):
    import random

    self.rng, self.vocab_size, self.length = random.Random(seed), vocab_size, length

  def take(self, n: int) -> list[list[int]]:
    return [[self.rng.randrange(self.vocab_size) for _ in range(self.length)] for _ in range(n)]


def run_requests(
  engine, prompts: list[list[int]], params: list, advance: Callable[[int], None], t0: float
) -> list[dict]:
  """LLM.generate with timings: add every request, step the engine until all finish. Each request's prompt and
  output token counts, finish reason and arrival / first token / finish times in seconds from t0."""
  timings = {}
  for prompt, sp in zip(prompts, params):
    request_id = engine.add_request(prompt, sp)
    timings[request_id] = {"prompt_tokens": len(prompt), "arrival": now() - t0}
  while engine.has_unfinished_requests():
    for out in engine.step():
      timing = timings[out.request_id]
      timing.setdefault("first_token", now() - t0)
      advance(len(out.delta_token_ids))
      if out.finished:
        timing |= {"finish": now() - t0, "output_tokens": len(out.token_ids), "finish_reason": out.finish_reason}
  return list(timings.values())


# ---- the machine -----------------------------------------------------------------------------


def version(pkg: str) -> str | None:
  try:
    return metadata.version(pkg)
  except metadata.PackageNotFoundError:
    return None


def load_average() -> list[float] | None:
  return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


ENV_KEYS = ("DEV", "JITBEAM", "BEAM", "DEBUG", "OMP_NUM_THREADS", "NUM_CPU_THREADS", "CC", "TINYVLLM_WIDE")


def machine_info(device: str) -> dict:
  return {
    "platform": platform.platform(),
    "machine": platform.machine(),
    "processor": platform.processor() or None,
    "cpu_count": os.cpu_count(),
    "load_average": load_average(),
    "tinygrad_backend": device,
    "python": platform.python_version(),
    "tinyvllm": version("tinyvllm"),
    "tinygrad": version("tinygrad"),
    "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
  }


def machine_line(m: dict) -> str:
  env = m["env"]
  load = f", load average {m['load_average'][0]:.2f} at start" if m.get("load_average") else ""
  if m.get("load_average_end"):
    load += f" and {m['load_average_end'][0]:.2f} at the end"
  extra = f", JITBEAM={env['JITBEAM']}" if "JITBEAM" in env else ""
  if m["tinygrad_backend"].startswith("CPU"):  # clang-19 or newer compiles the 8-wide kernels (README, How it works)
    extra += f", compiler {env.get('CC', 'clang')}"
    if "TINYVLLM_WIDE" in env:
      extra += f" (TINYVLLM_WIDE={env['TINYVLLM_WIDE']})"
  return (
    f"{m['platform']}, {m['cpu_count']} CPUs{load}; tinygrad {m['tinygrad']} on {m['tinygrad_backend']}{extra}; "
    f"tinyvllm {m['tinyvllm']}; Python {m['python']}"
  )


# ---- one run: the command, the progress bar and the report ------------------------------------


def invocation(ctx: typer.Context) -> str:
  """The command as typed, from the options given on the command line (defaults and --note left out)."""
  parts = ["tinyvllm", *ctx.command_path.split()[1:]]
  for param in ctx.command.params:
    source = ctx.get_parameter_source(param.name)
    if param.name == "note" or source is None or source.name != "COMMANDLINE":  # typer vendors its own click
      continue
    value, flag = ctx.params.get(param.name), param.opts[0]
    if isinstance(value, bool):
      parts += [flag] if value else []
    elif isinstance(value, (list, tuple)) and param.multiple:
      parts += [f"{flag} {v}" for v in value]
    elif isinstance(value, (list, tuple)):
      parts.append(f"{flag} {' '.join(map(str, value))}")
    else:
      parts.append(f"{flag} {value}")
  return " ".join(parts)


@dataclass
class Run:
  """One preset's run: the command as typed, the device, the model, the machine (at the start) and the notes."""

  command: str
  device: str
  model: BenchModel
  machine: dict
  notes: list[str]

  @staticmethod
  def start(
    ctx: typer.Context, device: str | None, model: str | None, random_weights: bool, notes: list[str] | None
  ) -> Run:
    from tinyvllm_core import resolve_device

    dev = resolve_device(device)
    bench_model = resolve_bench_model(model, random_weights)
    return Run(invocation(ctx), dev, bench_model, machine_info(dev), notes or [])

  def finished(self) -> None:
    """Add the load average after the run (other jobs on a shared machine)."""
    self.machine["load_average_end"] = load_average()

  def data(self, preset: str, **fields) -> dict:
    """The JSON report: what ran where, the preset's own fields, the machine and the notes."""
    head = {"preset": preset, "command": self.command, "timestamp": timestamp(), "model": self.model.describe()}
    return head | {"device": self.device, **fields, "machine": self.machine, "notes": self.notes}

  def markdown(self, title: str, lines: list[str]) -> str:
    notes = [f"\nNote: {n}" for n in self.notes]
    return "\n".join([f"# tinyvllm bench {title}", "", f"`{self.command}`", "", *lines, *notes])

  def stem(self, preset: str) -> str:
    return f"{preset}-{self.model.slug}-{self.device.lower()}"


@contextmanager
def progress_bar(description: str, total: int, unit: str = "tokens") -> Iterator[Callable[[int], None]]:
  """A rich progress bar on stderr while requests run; yields advance(n)."""
  columns = (
    TextColumn("{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TextColumn(unit),
    TimeElapsedColumn(),
    TimeRemainingColumn(),
  )
  with Progress(*columns, console=ui.err, transient=True) as progress:
    task = progress.add_task(description, total=total)
    yield lambda n=1: progress.advance(task, n)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  align = ["---"] + ["---:"] * (len(header) - 1)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def emit(stem: str, data: dict, markdown: str, out_dir: Path, as_json: bool) -> None:
  """Write <stem>-<time>.json and .md into out_dir; print the markdown (or with as_json the JSON) to stdout."""
  stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
  json_path, md_path = out_dir / f"{stem}-{stamp}.json", out_dir / f"{stem}-{stamp}.md"
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
  except OSError as e:
    raise BenchError(f"cannot write results to {out_dir}: {e}") from None
  if as_json:
    print(json.dumps(data, indent=2))
  else:
    ui.say(markdown.rstrip())
    ui.say("")
  ui.err.print(f"wrote {json_path} and {md_path.name}", soft_wrap=True, highlight=False)


def now() -> float:
  return time.perf_counter()


def timestamp() -> str:
  return datetime.now().astimezone().isoformat(timespec="seconds")
