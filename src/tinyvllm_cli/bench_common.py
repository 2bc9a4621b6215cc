"""What every `tinyvllm bench` preset shares: the model under test (real weights, random weights from a
config, or the seed's toy), the machine description, the progress bar and the JSON + markdown report."""
from __future__ import annotations

import json
import math
import os
import platform
import re
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
  from tinyvllm_core.loader import ModelFiles

TOY = "toy"
# the seed's toy model (000): dim=64, n_layers=4, n_heads=4, as a Llama config with a small vocabulary
TOY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024, "hidden_size": 64,
              "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
SHIPPED_ALIASES = {EMBEDDED_ALIAS: "HuggingFaceTB/SmolLM2-135M-Instruct"}


class BenchError(Exception):
  """Bad bench input; the CLI prints it as one line."""


# ---- the model under test --------------------------------------------------------------------

@dataclass
class BenchModel:
  """A model to benchmark: real weights from `path` (HF folder or .gguf), or random weights shaped by `hf_config`."""
  name: str
  path: Path | None = None
  hf_config: dict | None = None  # config.json contents; None for a GGUF until it is loaded
  random_weights: bool = False
  _loaded: ModelFiles | None = field(default=None, repr=False)  # ModelFiles read early (a GGUF's config lives in its weights file)
  _config: ModelConfig | None = field(default=None, repr=False)

  @property
  def name_slug(self) -> str: return re.sub(r"[^a-z0-9.]+", "-", self.name.lower()).strip("-")
  @property
  def slug(self) -> str: return self.name_slug + ("-random" if self.random_weights and self.name != TOY else "")

  def model_config(self) -> ModelConfig:
    """The engine's ModelConfig (a GGUF is read once here and its weights kept for `files`)."""
    if self._config is None:
      if self.hf_config is not None: self._config = model_config_from_dict(self.hf_config)
      else:
        self._loaded = _load_files(self.path, "CPU")
        self._config = self._loaded.config
    return self._config

  def files(self, device: str) -> ModelFiles:
    """ModelFiles for LLMEngine; the engine takes ownership of the weights."""
    if self.random_weights: return random_model_files(self.model_config(), device)
    loaded, self._loaded = self._loaded, None
    files = loaded or _load_files(self.path, device)
    self._config = files.config
    return files

  def describe(self) -> dict:
    return {"name": self.name, "path": str(self.path) if self.path else None, "random_weights": self.random_weights,
            "config": self.hf_config or (hf_config_from(self.model_config()) if self.path else None)}


def _load_files(path: Path, device: str) -> ModelFiles:
  from tinyvllm_core import ConfigError
  from tinyvllm_core.loader import load_model_files
  try: return load_model_files(path, device)
  except ConfigError as e: raise BenchError(str(e)) from None


def model_config_from_dict(cfg: dict) -> ModelConfig:
  """ModelConfig.from_hf reads a file; write the dict to a temp file so the engine's own parser checks it."""
  import tempfile
  from tinyvllm_core import ConfigError, ModelConfig
  with tempfile.TemporaryDirectory() as tmp:
    (path := Path(tmp, "config.json")).write_text(json.dumps(cfg))
    try: return ModelConfig.from_hf(path)
    except ConfigError as e: raise BenchError(str(e).replace(str(path), "config.json")) from None


def hf_config_from(mc: ModelConfig) -> dict:
  """An HF config.json for a ModelConfig (a GGUF's shapes, for backends that build models from configs)."""
  arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[mc.family]
  return {"architectures": [arch], "model_type": mc.family, "vocab_size": mc.vocab_size, "hidden_size": mc.hidden_size,
          "intermediate_size": mc.intermediate_size, "num_hidden_layers": mc.num_layers, "num_attention_heads": mc.num_heads,
          "num_key_value_heads": mc.num_kv_heads, "head_dim": mc.head_dim, "rms_norm_eps": mc.rms_norm_eps,
          "rope_theta": mc.rope_theta, "max_position_embeddings": mc.max_position_embeddings,
          "tie_word_embeddings": mc.tie_word_embeddings}


def shipped_configs() -> dict[str, Path]:
  """The real config.json of a few public models, shipped with the package: repo id -> file."""
  folder = resources.files("tinyvllm_cli") / "configs"
  org = {"Qwen3": "Qwen", "SmolLM2": "HuggingFaceTB", "Llama": "meta-llama"}
  return {f"{org[p.name.split('-')[0]]}/{p.name[:-5]}": Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json")}


def _read_config(path: Path) -> dict:
  try: return json.loads(path.read_text())
  except (OSError, ValueError) as e: raise BenchError(f"{path}: cannot read config.json ({e})") from None


def resolve_bench_model(name: str | None, random_weights: bool) -> BenchModel:
  """`toy`, a real model (path, pulled repo id, `smollm2`), or with random_weights a config: a shipped repo id,
  a config.json path, a model folder or .gguf whose shapes are used."""
  if name == TOY: return BenchModel(TOY, hf_config=dict(TOY_CONFIG), random_weights=True)
  if random_weights: return _random_model(name or "Qwen/Qwen3-0.6B")
  try: path = resolve_model(name)
  except ModelNotFoundError as e:
    hint = "; or add --random-weights to run its real shapes with random weights" if name in shipped_configs() else ""
    raise BenchError(f"{e}{hint}") from None
  return BenchModel(display_name(name, path), path=path, hf_config=_read_config(path / "config.json") if path.is_dir() else None)


def display_name(name: str | None, path: Path) -> str:
  """A repo id or alias as given (its last part); a path by its folder or file name."""
  if name and not Path(name).expanduser().exists(): return name.split("/")[-1]
  return path.stem if path.is_file() else path.name


def _random_model(name: str) -> BenchModel:
  shipped = shipped_configs()
  repo_id = SHIPPED_ALIASES.get(name, name)
  if repo_id in shipped: return BenchModel(repo_id.split("/")[-1], hf_config=_read_config(shipped[repo_id]), random_weights=True)
  path = Path(name).expanduser()
  if path.suffix == ".json":
    if not path.is_file(): raise BenchError(f"{name}: no such config file")
    return BenchModel(path.parent.name if path.name == "config.json" else path.stem, hf_config=_read_config(path), random_weights=True)
  try: path = resolve_model(name)
  except ModelNotFoundError as e:
    raise BenchError(f"{e}; with --random-weights --model also takes a config.json path or one of: {', '.join(sorted(shipped))}") from None
  if path.is_dir(): return BenchModel(display_name(name, path), hf_config=_read_config(path / "config.json"), random_weights=True)
  return BenchModel(display_name(name, path), path=path, random_weights=True)


def _uniform(shape: tuple[int, ...], seed: int, scale: float, device: str) -> Tensor:
  """Counter-hash uniform(-scale, scale): one compiled kernel per shape (tinygrad's rand compiles one per call)."""
  from tinygrad import Tensor, dtypes
  x = Tensor.arange(math.prod(shape), dtype=dtypes.uint32).to(device) * 0x9E3779B1 + Tensor([seed], dtype=dtypes.uint32, device=device)
  for mul in (0x85EBCA6B, 0xC2B2AE35): x = (x ^ (x >> 16)) * mul
  x = x ^ (x >> 16)
  return (((x >> 8).cast(dtypes.float32) * (2.0 / (1 << 24)) - 1.0) * scale).reshape(shape)


def random_weights(mc: ModelConfig, device: str, std: float = 0.02) -> dict[str, Tensor]:
  """The engine's canonical weights for a ModelConfig, random (std 0.02), built lazily on the device."""
  from tinygrad import Tensor
  seeds = iter(range(1, 1 << 30))
  def w(*shape: int) -> Tensor: return _uniform(shape, next(seeds), std * math.sqrt(3), device)
  def ones(n: int) -> Tensor: return Tensor.ones(n, device=device).contiguous()
  H, I, hd = mc.hidden_size, mc.intermediate_size, mc.head_dim
  weights = {"embed": w(mc.vocab_size, H), "norm": ones(H)}
  weights["lm_head"] = weights["embed"] if mc.tie_word_embeddings else w(mc.vocab_size, H)
  for i in range(mc.num_layers):
    p = f"layers.{i}."
    qkv = (mc.num_heads + 2 * mc.num_kv_heads) * hd
    weights |= {p + "qkv": w(qkv, H), p + "o": w(H, mc.num_heads * hd), p + "gate_up": w(2 * I, H), p + "down": w(H, I),
                p + "attn_norm": ones(H), p + "mlp_norm": ones(H)}
    if mc.qkv_bias: weights[p + "qkv_bias"] = Tensor.zeros(qkv, device=device).contiguous()
    if mc.qk_norm: weights |= {p + "q_norm": ones(hd), p + "k_norm": ones(hd)}
  return weights


def random_model_files(mc: ModelConfig, device: str) -> ModelFiles:
  from tinyvllm_core.loader import ModelFiles
  return ModelFiles(config=mc, weights=random_weights(mc, device), tokenizer=None)


def resolve_device(name: str | None) -> str:
  """The tinygrad backend to run on (made the default device), or a BenchError listing the ones that work."""
  from tinyvllm_core import ConfigError
  from tinyvllm_core.engine import resolve_device as engine_resolve_device
  try: return engine_resolve_device(name)
  except ConfigError as e: raise BenchError(str(e)) from None


# ---- the machine -----------------------------------------------------------------------------

def version(pkg: str) -> str | None:
  try: return metadata.version(pkg)
  except metadata.PackageNotFoundError: return None


def machine_info(device: str) -> dict:
  return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor() or None,
          "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
          "tinygrad_backend": device, "python": platform.python_version(),
          "tinyvllm": version("tinyvllm"), "tinygrad": version("tinygrad"),
          "env": {k: v for k in ("DEV", "JITBEAM", "BEAM", "DEBUG", "OMP_NUM_THREADS", "NUM_CPU_THREADS", "CC", "TINYVLLM_WIDE") if (v := os.environ.get(k)) is not None}}


def with_end_load(machine: dict) -> dict:
  """machine_info taken before the run, plus the load average after it (other jobs on a shared machine)."""
  return machine | {"load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def machine_line(m: dict) -> str:
  load = f", load average {m['load_average'][0]:.2f} at start" if m.get("load_average") else ""
  load += f" and {m['load_average_end'][0]:.2f} at the end" if m.get("load_average_end") else ""
  beam = f", JITBEAM={m['env']['JITBEAM']}" if "JITBEAM" in m["env"] else ""
  if m["tinygrad_backend"].startswith("CPU"):  # clang-19 or newer compiles the 8-wide kernels (README, How it works)
    beam += f", compiler {m['env'].get('CC', 'clang')}" + (f" (TINYVLLM_WIDE={m['env']['TINYVLLM_WIDE']})" if "TINYVLLM_WIDE" in m["env"] else "")
  return (f"{m['platform']}, {m['cpu_count']} CPUs{load}; tinygrad {m['tinygrad']} on {m['tinygrad_backend']}{beam}; "
          f"tinyvllm {m['tinyvllm']}; Python {m['python']}")


# ---- progress and reports --------------------------------------------------------------------

@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
  """A rich progress bar on stderr while requests run; yields advance(n)."""
  columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
             TimeElapsedColumn(), TimeRemainingColumn())
  with Progress(*columns, console=ui.err, transient=True) as progress:
    task = progress.add_task(description, total=total)
    yield lambda n=1: progress.advance(task, n)


def invocation(ctx: typer.Context) -> str:
  """The command as typed, from the options given on the command line (defaults and --note left out)."""
  parts = ["tinyvllm", *ctx.command_path.split()[1:]]
  for param in ctx.command.params:
    if param.name == "note": continue
    value = ctx.params.get(param.name)
    source = ctx.get_parameter_source(param.name)
    if source is None or source.name != "COMMANDLINE": continue  # typer vendors its own click
    flag = param.opts[0]
    if isinstance(value, bool): parts += [flag] if value else []
    elif isinstance(value, (list, tuple)) and param.multiple: parts += [f"{flag} {v}" for v in value]
    elif isinstance(value, (list, tuple)): parts.append(f"{flag} {' '.join(map(str, value))}")
    else: parts.append(f"{flag} {value}")
  return " ".join(parts)


@dataclass
class Report:
  preset: str
  model_slug: str
  device: str
  data: dict
  markdown: str


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_report(report: Report, out_dir: Path) -> tuple[Path, Path]:
  stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
  stem = f"{report.preset}-{report.model_slug}-{report.device.lower()}-{stamp}"
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
    (json_path := out_dir / f"{stem}.json").write_text(json.dumps(report.data, indent=2) + "\n")
    (md_path := out_dir / f"{stem}.md").write_text(report.markdown.rstrip() + "\n")
  except OSError as e: raise BenchError(f"cannot write results to {out_dir}: {e}") from None
  return json_path, md_path


def emit(report: Report, out_dir: Path, as_json: bool) -> None:
  json_path, md_path = write_report(report, out_dir)
  if as_json: print(json.dumps(report.data, indent=2))
  else:
    ui.say(report.markdown.rstrip())
    ui.say("")
  ui.err.print(f"wrote {json_path} and {md_path.name}", soft_wrap=True, highlight=False)


def now() -> float: return time.perf_counter()


def timestamp() -> str: return datetime.now().astimezone().isoformat(timespec="seconds")
