from tinyvllm_cli.main import app

app(prog_name="tinyvllm")
