"""The `tinyvllm` command. Each command lives in its own module; this file only registers them:
a plain command is `app.command("name")(module.function)`, a command group is `app.add_typer(module.app, name=...)`."""

from __future__ import annotations

import typer

from tinyvllm_cli import bench, chat, devices, hub, serve

app = typer.Typer(
  name="tinyvllm",
  help="A tiny vLLM on tinygrad: pull a model, chat with it, benchmark it, serve it.\n\n"
  "Example: tinyvllm pull Qwen/Qwen3-0.6B, then tinyvllm chat",
  no_args_is_help=True,
  add_completion=False,
  pretty_exceptions_show_locals=False,
  context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("pull")(hub.pull)
app.command("list")(hub.list_models)
app.command("rm")(hub.rm)
app.add_typer(bench.app, name="bench")
app.command("serve-lite")(serve.serve_lite)
app.command("chat")(chat.chat)
app.command("devices")(devices.devices)

if __name__ == "__main__":
  app()
