"""The vLLM hand-off (studio/serve/vllm.py) without a GPU or vLLM: real adapter folders of each
method, the verdicts vLLM's own loader would reach, the command, and the refusal here.

The command is checked by reading it back with vLLM's rules (``--lora-modules name=path``, a
``--max-lora-rank`` from vLLM's allowed values); the key must never be in argv (``ps`` shows it
to every user of the machine)."""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import sys

import pytest
from chat_helpers import save_bottleneck_adapter, save_peft_adapter

from studio.serve import vllm
from studio.serve.catalog import Catalog

SECRET = "sk-test-secret-4242"


@pytest.fixture(scope="module")
def adapters(tiny_chat_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-adapters")
    dirs = {"lora8": save_peft_adapter(tiny_chat_model, root / "lora8", "lora", seed=1, r=8),
            "lora40": save_peft_adapter(tiny_chat_model, root / "lora40", "lora", seed=2, r=40)}
    for seed, method in enumerate(("rslora", "dora", "ia3", "prompt", "prefix"), start=3):
        dirs[method] = save_peft_adapter(tiny_chat_model, root / method, method, seed=seed)
    dirs["bottleneck"] = save_bottleneck_adapter(tiny_chat_model, root / "bottleneck", seed=9)
    return dirs


def catalog(base, adapters: dict) -> Catalog:
    return Catalog(base_source=str(base), base_name="tiny/chat", adapters=dict(adapters), allowed_roots=[])


def test_only_plain_lora_is_servable_each_other_kind_says_why(adapters, tiny_chat_model):
    found = {name: vllm.adapter_verdict(folder, tiny_chat_model) for name, folder in adapters.items()}
    assert found["lora8"] is None and found["lora40"] is None
    assert found["rslora"] is None  # vLLM scales by alpha / sqrt(r) when use_rslora is set
    assert "DoRA" in found["dora"]
    assert "PEFT type IA3" in found["ia3"] and "only LoRA" in found["ia3"]
    assert "PROMPT_TUNING" in found["prompt"] and "PREFIX_TUNING" in found["prefix"]
    assert "bottleneck" in found["bottleneck"] and "only LoRA" in found["bottleneck"]


def test_lora_refusals_vllm_applies(adapters, tmp_path):
    """The config fields vLLM refuses, a pickled adapter, and an adapter trained on another model."""
    def variant(name: str, **config_changes):
        folder = shutil.copytree(adapters["lora8"], tmp_path / name)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
        return folder

    assert "lm_head in modules_to_save" in vllm.adapter_verdict(variant("saved", modules_to_save=["lm_head"]))
    assert "biases" in vllm.adapter_verdict(variant("bias", bias="lora_only"))
    assert "pissa" in vllm.adapter_verdict(variant("pissa", init_lora_weights="pissa"))
    assert "above vLLM's largest --max-lora-rank, 512" in vllm.adapter_verdict(variant("huge", r=1024))
    pickled = variant("pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    assert "pickled .bin adapters are not loaded" in vllm.adapter_verdict(pickled)
    truncated = variant("truncated")
    (truncated / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00")
    assert "unreadable" in vllm.adapter_verdict(truncated)

    other_base = tmp_path / "other-base"  # a model whose matrices have other names
    other_base.mkdir()
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"transformer.h.0.attn.c_attn.weight": np.zeros((4, 4), dtype=np.float32)},
              str(other_base / "model.safetensors"))
    why = vllm.adapter_verdict(adapters["lora8"], other_base)
    assert "do not match the base model" in why and "model.layers.0.mlp.down_proj" in why


def test_command_holds_exactly_the_lora_adapters(adapters, tiny_chat_model, tmp_path):
    command = vllm.build_command(catalog(tiny_chat_model, adapters), host="127.0.0.1", port=8123,
                                 api_key=SECRET, max_active=2)
    assert command[:5] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(tiny_chat_model)]
    assert not any(SECRET in part for part in command)  # the key goes by environment only
    option = {command[i]: command[i + 1] for i in range(5, len(command) - 1) if command[i].startswith("--")}
    assert (option["--served-model-name"], option["--host"], option["--port"]) == ("tiny/chat", "127.0.0.1", "8123")
    assert "--enable-lora" in command
    start = command.index("--lora-modules") + 1
    modules = command[start:command.index("--max-lora-rank")]
    assert modules == [f"{name}={adapters[name].resolve()}" for name in ("lora8", "lora40", "rslora")]
    assert option["--max-lora-rank"] == "64"  # 40 rounded up to vLLM's next allowed value
    assert (option["--max-loras"], option["--max-cpu-loras"]) == ("2", "3")  # 2 on the GPU, all 3 in RAM

    comma = shutil.copytree(adapters["lora8"], tmp_path / "a,b")  # vLLM reads a comma as JSON
    small = vllm.build_command(catalog(tiny_chat_model, {"only8": comma}), host="127.0.0.1", port=1,
                               api_key=None, max_active=1)
    assert json.loads(small[small.index("--lora-modules") + 1]) == {
        "name": "only8", "path": str(comma.resolve()), "base_model_name": "tiny/chat"}
    assert small[small.index("--max-lora-rank") + 1] == "8"

    base_only = vllm.build_command(catalog(tiny_chat_model, {"d": adapters["dora"]}), host="127.0.0.1",
                                   port=1, api_key=None, max_active=1)
    assert "--enable-lora" not in base_only and "--lora-modules" not in base_only
    with pytest.raises(ValueError, match="max_active"):
        vllm.build_command(catalog(tiny_chat_model, {}), host="127.0.0.1", port=1, api_key=None, max_active=0)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_run_prints_verdicts_and_command_then_refuses_without_vllm(adapters, tiny_chat_model, capsys):
    assert vllm.unavailable() == vllm.NOT_INSTALLED
    code = vllm.run(catalog(tiny_chat_model, adapters), host="127.0.0.1", port=8123, api_key=SECRET,
                    max_active=2)
    out, err = capsys.readouterr()
    assert code == 2
    assert err.strip() == f"refused: {vllm.NOT_INSTALLED}"
    assert "adapter lora40: served by vLLM" in out and "adapter ia3: not served: ia3 adapter (PEFT type IA3)" in out
    line = next(line for line in out.splitlines() if "vllm.entrypoints.cli.main serve" in line)
    assert line.strip().startswith(f'VLLM_API_KEY="$VLLM_API_KEY" {sys.executable} -m vllm.entrypoints.cli.main serve ')
    portable = next(line for line in out.splitlines() if " vllm serve " in line).strip()
    assert portable.startswith(f'VLLM_API_KEY="$VLLM_API_KEY" vllm serve {tiny_chat_model} ')
    assert portable.split(" serve ", 1)[1] == line.split(" serve ", 1)[1]
    assert SECRET not in out + err


def test_run_refuses_an_exposed_host_without_a_key(adapters, tiny_chat_model, capsys):
    code = vllm.run(catalog(tiny_chat_model, {"lora8": adapters["lora8"]}), host="0.0.0.0", port=8123,
                    api_key=None, max_active=1)
    assert code == 2
    assert "0.0.0.0 is reachable from other machines" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_cli_engine_vllm_prints_the_verdicts_and_exits_2(adapters, tiny_chat_model):
    """``peft-studio serve --engine vllm`` as a user runs it: the same verdicts and command, the
    reason on stderr, exit code 2, and no model loaded (it answers in seconds)."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "studio", "serve", "--engine", "vllm", "--model", str(tiny_chat_model),
         "--adapter", f"lora40={adapters['lora40']}", "--adapter", f"prefix={adapters['prefix']}",
         "--port", "8124", "--max-active", "4"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "adapter lora40: served by vLLM" in proc.stdout
    assert "adapter prefix: not served: prefix adapter (PEFT type PREFIX_TUNING)" in proc.stdout
    module = shlex.quote(f"lora40={adapters['lora40'].resolve()}")
    assert f"--lora-modules {module} --max-lora-rank 64 --max-loras 4" in proc.stdout
    assert proc.stderr.strip().endswith(vllm.NOT_INSTALLED)


# A stand-in for vLLM's server (it needs a GPU): /health answers 200; with "once" it then exits 3.
HEALTH_SERVER = """
import http.server, pathlib, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        pathlib.Path(sys.argv[3]).touch()
    def log_message(self, *args): pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
if sys.argv[2] == "once":
    server.handle_request(); sys.exit(3)
server.serve_forever()
"""


def test_supervise_prints_the_ready_line_forwards_exit_code_and_stops_on_sigterm(tmp_path, capsys):
    """The child's /health makes the studio's ready line (what the Serve panel waits for); its
    exit code is returned; SIGTERM to us stops the child and is a clean 0."""
    import os
    import signal
    import threading
    import time

    port = vllm._free_port("127.0.0.1")
    hit = tmp_path / "hit"
    code = vllm.supervise([sys.executable, "-c", HEALTH_SERVER, str(port), "once", str(hit)], dict(os.environ),
                          "127.0.0.1", port, served=3, poll_s=0.1)
    assert code == 3
    assert capsys.readouterr().out == f"PEFT Studio serving 3 models at http://127.0.0.1:{port}/v1\n"

    hit.unlink()
    port = vllm._free_port("127.0.0.1")

    def terminate_when_ready():
        deadline = time.monotonic() + 30
        while not hit.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)  # our handler (installed by supervise) takes it

    threading.Thread(target=terminate_when_ready, daemon=True).start()
    previous = signal.getsignal(signal.SIGTERM)
    assert vllm.supervise([sys.executable, "-c", HEALTH_SERVER, str(port), "forever", str(hit)],
                          dict(os.environ), "127.0.0.1", port, served=1, poll_s=0.1) == 0
    assert signal.getsignal(signal.SIGTERM) is previous  # our handler is gone again
    assert "PEFT Studio serving 1 models" in capsys.readouterr().out
