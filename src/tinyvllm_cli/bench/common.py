"""What the bench presets share: the model under test, running requests, the machine and the JSON + markdown report."""

from __future__ import annotations

import json
import math
import os
import platform
import random
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
ENV_KEYS = ("DEV", "JITBEAM", "BEAM", "DEBUG", "OMP_NUM_THREADS", "NUM_CPU_THREADS", "CC", "TINYVLLM_WIDE")


class BenchError(Exception):
  """Bad bench input; the CLI prints it as one line."""


@contextmanager
def one_line_errors() -> Iterator[None]:
  """Expected failures (bad input, a model or device that is not there) as one `error:` line."""
  try:
    yield
  except (BenchError, ValueError) as e:
    ui.fail(e)


def parse_ints(text: str, option: str, example: str) -> list[int]:
  """ "1,8,32" -> [1, 8, 32] (duplicates dropped, order kept); anything else is a BenchError."""
  try:
    values = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise BenchError(f"{option} {text!r}: expected positive integers like {example}")
  return list(dict.fromkeys(values))


@dataclass
class BenchModel:
  """Real weights from `path` (HF folder or .gguf), or random weights shaped by `hf_config`."""

  name: str
  path: Path | None = None
  hf_config: dict | None = None  # None for a GGUF: its config lives in its weights
  random_weights: bool = False
  _loaded: ModelFiles | None = field(default=None, repr=False)
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
    from tinyvllm_core.formats import load_model_files

    if self._config is None and self.hf_config is not None:
      self._config = model_config_from_dict(self.hf_config)
    elif self._config is None:
      self._loaded = load_model_files(self.path, "CPU")
      self._config = self._loaded.config
    return self._config

  def files(self, device: str) -> ModelFiles:
    """ModelFiles for LLMEngine, which takes ownership of the weights."""
    from tinyvllm_core.formats import ModelFiles, load_model_files

    if self.random_weights:
      return ModelFiles(config=self.model_config(), weights=random_weights(self.model_config(), device), tokenizer=None)
    files = self._loaded or load_model_files(self.path, device)
    self._loaded = None
    self._config = files.config
    return files

  def describe(self) -> dict:
    config = self.hf_config or (hf_config_from(self.model_config()) if self.path else None)
    path = str(self.path) if self.path else None
    return {"name": self.name, "path": path, "random_weights": self.random_weights, "config": config}


def model_config_from_dict(cfg: dict) -> ModelConfig:
  """The engine's own parser checks the dict (written to a temporary config.json)."""
  from tinyvllm_core.formats import read_hf_config

  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp, "config.json")
    path.write_text(json.dumps(cfg))
    try:
      return read_hf_config(path)
    except ValueError as e:
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
  """`toy`, a real model (path, pulled repo id, `smollm2`), or with random_weights the shapes of a shipped repo id,
  a config.json, a model folder or a .gguf."""
  if name == TOY:
    return BenchModel(TOY, hf_config=dict(TOY_CONFIG), random_weights=True)
  name = name or ("Qwen/Qwen3-0.6B" if random_weights else None)
  shipped = shipped_configs()
  repo_id = SHIPPED_ALIASES.get(name, name)
  if random_weights and repo_id in shipped:
    return BenchModel(repo_id.split("/")[-1], hf_config=read_config(shipped[repo_id]), random_weights=True)
  json_path = Path(name).expanduser() if name else None
  if random_weights and json_path.suffix == ".json":
    if not json_path.is_file():
      raise BenchError(f"{name}: no such config file")
    display = json_path.parent.name if json_path.name == "config.json" else json_path.stem
    return BenchModel(display, hf_config=read_config(json_path), random_weights=True)
  try:
    path = resolve_model(name)
  except ModelNotFoundError as e:
    if random_weights:
      hint = f"; with --random-weights --model also takes a config.json path or one of: {', '.join(sorted(shipped))}"
    else:
      hint = "; or add --random-weights to run its real shapes with random weights" if name in shipped else ""
    raise BenchError(f"{e}{hint}") from None
  display = path.stem if path.is_file() else path.name
  if name and not Path(name).expanduser().exists():
    display = name.split("/")[-1]
  hf_config = read_config(path / "config.json") if path.is_dir() else None
  if path.is_dir() and not random_weights:
    return BenchModel(display, path=path, hf_config=hf_config)
  if path.is_dir():
    return BenchModel(display, hf_config=hf_config, random_weights=True)
  return BenchModel(display, path=path, random_weights=random_weights)


def random_weights(mc: ModelConfig, device: str, std: float = 0.02) -> dict[str, Tensor]:
  """The engine's canonical weights, uniform with std 0.02 from the core's counter hash (one compiled kernel per
  shape), built lazily on the device."""
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

  hidden = mc.hidden_size
  qkv = (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim
  weights = {"embed": w(mc.vocab_size, hidden), "norm": ones(hidden)}
  weights["lm_head"] = weights["embed"] if mc.tie_word_embeddings else w(mc.vocab_size, hidden)
  for i in range(mc.num_layers):
    p = f"layers.{i}."
    weights[p + "qkv"] = w(qkv, hidden)
    weights[p + "o"] = w(hidden, mc.num_heads * mc.head_dim)
    weights[p + "gate_up"] = w(2 * mc.intermediate_size, hidden)
    weights[p + "down"] = w(hidden, mc.intermediate_size)
    weights[p + "attn_norm"] = ones(hidden)
    weights[p + "mlp_norm"] = ones(hidden)
    if mc.qkv_bias:
      weights[p + "qkv_bias"] = Tensor.zeros(qkv, device=device).contiguous()
    if mc.qk_norm:
      weights[p + "q_norm"] = ones(mc.head_dim)
      weights[p + "k_norm"] = ones(mc.head_dim)
  return weights


class PromptSource:
  """Distinct random token-id prompts (no two share a block, so the prefix cache never helps)."""

  def __init__(self, vocab_size: int, length: int, seed: int):
    self.rng = random.Random(seed)
    self.vocab_size = vocab_size
    self.length = length

  def take(self, n: int) -> list[list[int]]:
    return [[self.rng.randrange(self.vocab_size) for _ in range(self.length)] for _ in range(n)]


def run_requests(
  engine, prompts: list[list[int]], params: list, advance: Callable[[int], None], t0: float
) -> list[dict]:
  """Add every request and step the engine until all finish; each request's token counts, finish reason and
  arrival / first token / finish times in seconds from t0."""
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


def version(pkg: str) -> str | None:
  try:
    return metadata.version(pkg)
  except metadata.PackageNotFoundError:
    return None


def machine_info(device: str) -> dict:
  return {
    "platform": platform.platform(),
    "machine": platform.machine(),
    "processor": platform.processor() or None,
    "cpu_count": os.cpu_count(),
    "load_average": list(os.getloadavg()),
    "tinygrad_backend": device,
    "python": platform.python_version(),
    "tinyvllm": version("tinyvllm"),
    "tinygrad": version("tinygrad"),
    "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
  }


def machine_line(m: dict) -> str:
  end = m.get("load_average_end")
  load = f"load average {m['load_average'][0]:.2f} at start" + (f" and {end[0]:.2f} at the end" if end else "")
  env = "".join(f", {k}={v}" for k, v in m["env"].items())
  return (
    f"{m['platform']}, {m['cpu_count']} CPUs, {load}; tinygrad {m['tinygrad']} on {m['tinygrad_backend']}{env}; "
    f"tinyvllm {m['tinyvllm']}; Python {m['python']}"
  )


def invocation(ctx: typer.Context) -> str:
  """The command as typed, from the options given on the command line (defaults and --note left out)."""
  parts = ["tinyvllm", *ctx.command_path.split()[1:]]
  for param in ctx.command.params:
    source = ctx.get_parameter_source(param.name)
    if param.name == "note" or source is None or source.name != "COMMANDLINE":  # typer vendors its own click
      continue
    value = ctx.params.get(param.name)
    flag = param.opts[0]
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
  """One preset's run: the command as typed, the device, the model (the first of `models` when a preset takes
  several), the machine and the notes."""

  command: str
  device: str
  model: BenchModel
  machine: dict
  notes: list[str]
  models: list[BenchModel] = field(default_factory=list)

  @staticmethod
  def start(ctx: typer.Context, device: str | None, model: str | list[str] | None, random_weights: bool, notes) -> Run:
    from tinyvllm_core import resolve_device

    dev = resolve_device(device)
    names = list(dict.fromkeys(model)) if isinstance(model, list) else [model]
    bench_models = [resolve_bench_model(name, random_weights) for name in names]
    same = [m.name for m in bench_models if [b.name for b in bench_models].count(m.name) > 1]
    if same:
      raise BenchError(f"two --model values are both named {same[0]!r}: copy or rename one")
    return Run(invocation(ctx), dev, bench_models[0], machine_info(dev), notes or [], bench_models)

  def finished(self) -> None:
    self.machine["load_average_end"] = list(os.getloadavg())

  def data(self, preset: str, **fields) -> dict:
    """The JSON report: what ran where, the preset's own fields, the machine and the notes."""
    head = {"preset": preset, "command": self.command, "timestamp": timestamp(), "model": self.model.describe()}
    if len(self.models) > 1:
      head["models"] = [m.describe() for m in self.models]
    return head | {"device": self.device, **fields, "machine": self.machine, "notes": self.notes}

  def markdown(self, preset: str, lines: list[str]) -> str:
    title = f"# tinyvllm bench {preset}: {', '.join(m.name for m in self.models or [self.model])} on {self.device}"
    machine = f"Machine: {machine_line(self.machine)}"
    notes = [f"\nNote: {n}" for n in self.notes]
    return "\n".join([title, "", f"`{self.command}`", "", machine, "", *lines, *notes])

  def weights(self) -> str:
    return "random weights" if self.model.random_weights else "real weights"

  def emit(self, preset: str, data: dict, markdown: str, out_dir: Path, as_json: bool) -> None:
    more = f"-and-{len(self.models) - 1}-more" if len(self.models) > 1 else ""
    emit(f"{preset}-{self.model.slug}{more}-{self.device.lower()}", data, markdown, out_dir, as_json)


@contextmanager
def progress_bar(description: str, total: int, unit: str = "tokens") -> Iterator[Callable[[int], None]]:
  """A rich progress bar on stderr while requests run; yields advance(n)."""
  columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit))
  with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=ui.err, transient=True) as progress:
    task = progress.add_task(description, total=total)
    yield lambda n=1: progress.advance(task, n)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  align = ["---"] + ["---:"] * (len(header) - 1)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def emit(stem: str, data: dict, markdown: str, out_dir: Path, as_json: bool) -> None:
  """Write <stem>-<time>.json and .md into out_dir; print the markdown (or with as_json the JSON) to stdout."""
  stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
  json_path = out_dir / f"{stem}-{stamp}.json"
  md_path = out_dir / f"{stem}-{stamp}.md"
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
  except OSError as e:
    raise BenchError(f"cannot write results to {out_dir}: {e}") from None
  if as_json:
    print(json.dumps(data, indent=2))
  else:
    ui.say(markdown.rstrip() + "\n")
  ui.err.print(f"wrote {json_path} and {md_path.name}", soft_wrap=True, highlight=False)


def now() -> float:
  return time.perf_counter()


def timestamp() -> str:
  return datetime.now().astimezone().isoformat(timespec="seconds")
