"""A small fake Hugging Face Hub on 127.0.0.1 for `tinyvllm pull` tests (point HF_ENDPOINT at `hub.url`).

It answers what `huggingface_hub.snapshot_download` asks for: repo info
(`/api/models/{repo}/revision/{rev}`), the file tree (`/api/models/{repo}/tree/{rev}`), and
`HEAD`/`GET /{repo}/resolve/{rev}/{path}` (with `Range`), and marks errors with `X-Error-Code` as the Hub
does. Faults make a file's next GETs drop the connection or stall after some bytes."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

GOOD_TOKEN = "hf_granted"


@dataclass
class Repo:
  files: dict[str, bytes]
  gated: bool = False
  branches: tuple[str, ...] = ("main",)
  advertised: dict[str, int] = field(default_factory=dict)  # claimed sizes (a "huge" file)

  def __post_init__(self):
    digest = hashlib.sha1()
    for name in sorted(self.files):
      digest.update(name.encode() + self.files[name])
    self.sha = digest.hexdigest()

  def size(self, path: str) -> int:
    return self.advertised.get(path, len(self.files[path]))

  def etag(self, path: str) -> str:
    return hashlib.sha256(self.files[path]).hexdigest()


@dataclass
class Fault:
  kind: str  # "drop": close the connection after `after` body bytes; "stall": wait for `hub.release` first
  after: int


@dataclass
class Request:
  method: str
  path: str
  range: str | None
  auth: str | None


class FakeHub:
  def __init__(self, repos: dict[str, Repo]):
    self.repos = repos
    self.faults: dict[tuple[str, str], list[Fault]] = {}
    self.log: list[Request] = []
    self.stalled, self.release = threading.Event(), threading.Event()
    self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
    self.server.daemon_threads = True
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.server.server_address[1]}"

  def __enter__(self) -> FakeHub:
    self.thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self.release.set()
    self.server.shutdown()
    self.server.server_close()

  def reset(self) -> None:
    self.faults.clear()
    self.log.clear()
    self.stalled.clear()
    self.release.clear()

  def downloads(self) -> list[Request]:
    """The file GETs made so far."""
    return [r for r in self.log if r.method == "GET" and "/resolve/" in r.path]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
  class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
      pass

    def do_HEAD(self) -> None:
      self.do_GET()

    def do_GET(self) -> None:
      raw = urlsplit(self.path).path
      hub.log.append(Request(self.command, unquote(raw), self.headers.get("Range"), self.headers.get("Authorization")))
      parts = raw.strip("/").split("/")
      if parts[:2] == ["api", "models"] and len(parts) >= 5:
        return self.api(parts[2:])
      if len(parts) >= 5 and parts[2] == "resolve":
        return self.resolve(parts)
      self.send(404, {"error": "Not found"})

    def api(self, parts: list[str]) -> None:
      repo_id, kind, rev = "/".join(parts[:2]), parts[2], unquote(parts[3])
      if (repo := self.find(repo_id, rev)) is None:
        return
      if kind == "revision":
        return self.send(
          200,
          {
            "id": repo_id,
            "sha": repo.sha,
            "gated": "manual" if repo.gated else False,
            "siblings": [{"rfilename": f} for f in repo.files],
          },
        )
      self.send(
        200,
        [
          {"type": "file", "path": f, "size": repo.size(f), "oid": hashlib.sha1(d).hexdigest()}
          for f, d in repo.files.items()
        ],
      )

    def resolve(self, parts: list[str]) -> None:
      repo_id, rev, path = "/".join(parts[:2]), unquote(parts[3]), unquote("/".join(parts[4:]))
      if (repo := self.find(repo_id, rev)) is None or not self.allowed(repo_id, repo):
        return
      if path not in repo.files:
        return self.send(404, {"error": "Entry not found"}, "EntryNotFound", "Entry not found")
      data, size = repo.files[path], repo.size(path)
      start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
      headers = {
        "X-Repo-Commit": repo.sha,
        "ETag": f'"{repo.etag(path)}"',
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
      }
      if start:
        headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
      self.send_response(206 if start else 200)
      for k, v in {**headers, "Content-Length": str(size - start)}.items():
        self.send_header(k, v)
      self.end_headers()
      if self.command == "HEAD":
        return
      faults = hub.faults.get((repo_id, path))
      fault = faults.pop(0) if faults else None
      body = data[start:] if fault is None else data[start : start + fault.after]
      self.wfile.write(body)
      self.wfile.flush()
      if fault and fault.kind == "stall":
        hub.stalled.set()
        hub.release.wait(30)
      self.close_connection = True

    def find(self, repo_id: str, rev: str) -> Repo | None:
      repo = hub.repos.get(repo_id)
      if repo is None:
        self.send(404, {"error": "Repository not found"}, "RepoNotFound", "Repository not found")
      elif rev not in repo.branches and rev != repo.sha:
        self.send(404, {"error": f"Invalid rev id: {rev}"}, "RevisionNotFound", f"Invalid rev id: {rev}")
      else:
        return repo
      return None

    def allowed(self, repo_id: str, repo: Repo) -> bool:
      auth = self.headers.get("Authorization")
      if not repo.gated or auth == f"Bearer {GOOD_TOKEN}":
        return True
      if auth is None:
        msg = (
          f"Access to model {repo_id} is restricted. You must have access to it and be authenticated "
          "to access it. Please log in."
        )
        self.send(401, {"error": msg}, "GatedRepo", msg)
      else:
        msg = f"Access to model {repo_id} is restricted and you are not in the authorized list."
        self.send(403, {"error": msg}, "GatedRepo", msg)
      return False

    def send(self, code: int, obj: object, error_code: str | None = None, message: str | None = None) -> None:
      body = json.dumps(obj).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      if error_code:
        self.send_header("X-Error-Code", error_code)
      if message:
        self.send_header("X-Error-Message", message)
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(body)

  return Handler


# ---- model files -------------------------------------------------------------------------------


def random_bytes(n: int, seed: int = 0) -> bytes:
  return random.Random(seed).randbytes(n)


def safetensors_file(n_bytes: int, seed: int = 0) -> bytes:
  """A valid-looking safetensors file: one U8 tensor of random bytes."""
  header = json.dumps({"weight": {"dtype": "U8", "shape": [n_bytes], "data_offsets": [0, n_bytes]}}).encode()
  header += b" " * (-len(header) % 8)
  return struct.pack("<Q", len(header)) + header + random_bytes(n_bytes, seed)


def gguf_file(arch: str, tensors: dict[str, list[int]], seed: int = 0) -> bytes:
  """A minimal GGUF v3 file: general.architecture + F32 tensor infos + random data."""

  def string(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()

  kv = string("general.architecture") + struct.pack("<I", 8) + string(arch)
  kv += string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + string("a") + string("b")
  kv += string("general.alignment") + struct.pack("<II", 4, 32)
  infos, offset = b"", 0
  for name, dims in tensors.items():
    infos += (
      string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", 0, offset)
    )
    offset += 4 * _numel(dims)
  head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 3) + kv + infos
  return head + b"\0" * (-len(head) % 32) + random_bytes(offset, seed)


def _numel(dims: list[int]) -> int:
  n = 1
  for d in dims:
    n *= d
  return n


TINY_LLAMA_CONFIG = {
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "hidden_size": 64,
  "intermediate_size": 128,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "vocab_size": 1000,
  "max_position_embeddings": 256,
  "rms_norm_eps": 1e-5,
  "tie_word_embeddings": False,
}
TINY_LLAMA_PARAMS = "202K"  # 2 layers * (64*16*(2*4+2*2) + 3*64*128 + 2*64) + 2*1000*64 + 64 = 202,048


def tiny_llama_files(weights_kb: int = 300, seed: int = 0) -> dict[str, bytes]:
  return {
    "config.json": json.dumps(TINY_LLAMA_CONFIG).encode(),
    "generation_config.json": b'{"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.6}',
    "tokenizer.json": json.dumps(
      {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}
    ).encode(),
    "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
    "model.safetensors": safetensors_file(weights_kb * 1000, seed),
  }


def quantized_llama_files(quantization_config: dict, seed: int = 0) -> dict[str, bytes]:
  """A tiny Llama repo quantized for other engines (GPTQ, AWQ, FP8...): config.json has a quantization_config."""
  config = {**TINY_LLAMA_CONFIG, "quantization_config": quantization_config}
  return {**tiny_llama_files(weights_kb=50, seed=seed), "config.json": json.dumps(config).encode()}


QUANTIZED_REPOS = {
  "org/tiny-llama-GPTQ-Int4": {"quant_method": "gptq", "bits": 4, "group_size": 128},
  "org/tiny-llama-FP8": {"quant_method": "fp8", "activation_scheme": "dynamic"},
  "org/tiny-llama-bnb-4bit": {"quant_method": "bitsandbytes", "load_in_4bit": True},
  "org/tiny-llama-ct": {"quant_method": "compressed-tensors", "format": "pack-quantized"},
}
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


def default_repos() -> dict[str, Repo]:
  llama = tiny_llama_files()
  jinja = {**tiny_llama_files(weights_kb=20, seed=10), "tokenizer_config.json": b'{"eos_token": "</s>"}'}
  jinja["chat_template.jinja"] = TEMPLATE.encode()
  bert = {
    "config.json": json.dumps({"architectures": ["BertModel"], "model_type": "bert"}).encode(),
    "model.safetensors": safetensors_file(1000),
  }
  sharded = {k: v for k, v in tiny_llama_files(seed=3).items() if k != "model.safetensors"}
  sharded |= {
    "model-00001-of-00002.safetensors": safetensors_file(200_000, seed=4),
    "model-00002-of-00002.safetensors": safetensors_file(400_000, seed=5),
    "model.safetensors.index.json": b'{"weight_map": {}}',
  }
  gguf_tensors = {"token_embd.weight": [64, 1000], "blk.0.attn_q.weight": [64, 64]}
  return {
    "org/tiny-llama": Repo(
      {
        **llama,
        "README.md": b"# tiny",
        ".gitattributes": b"*.bin lfs",
        "pytorch_model.bin": random_bytes(5000),
        "onnx/model.safetensors": safetensors_file(500),
      },
      branches=("main", "v1"),
    ),
    "org/tiny-llama-GGUF": Repo(
      {
        "README.md": b"# gguf",
        "tiny-llama-Q8_0.gguf": gguf_file("llama", gguf_tensors, 1),
        "tiny-llama-Q4_K_M.gguf": gguf_file("llama", gguf_tensors, 2),
        "tiny-llama-Q4_K_S.gguf": gguf_file("llama", gguf_tensors, 11),
        "tiny-llama-Q6_K-00001-of-00002.gguf": gguf_file("llama", {"token_embd.weight": [64, 1000]}, 12),
        "tiny-llama-Q6_K-00002-of-00002.gguf": gguf_file("llama", {"blk.0.attn_q.weight": [64, 64]}, 13),
        "mmproj-tiny-llama-F16.gguf": gguf_file("clip", {"v.weight": [64, 64]}, 14),
      }
    ),
    "org/tiny-llama-jinja": Repo(jinja),
    **{
      name: Repo(quantized_llama_files(config, seed=20 + i)) for i, (name, config) in enumerate(QUANTIZED_REPOS.items())
    },
    "org/gated-llama": Repo(tiny_llama_files(weights_kb=20, seed=6), gated=True),
    "org/bert": Repo(bert),
    "org/flaky": Repo(tiny_llama_files(weights_kb=300, seed=7)),
    "org/flaky-big": Repo(tiny_llama_files(weights_kb=12_000, seed=9)),  # > one 10 MiB download chunk
    "org/sharded": Repo(sharded),
    "org/huge": Repo(tiny_llama_files(weights_kb=1, seed=8), advertised={"model.safetensors": 10**15}),
  }
