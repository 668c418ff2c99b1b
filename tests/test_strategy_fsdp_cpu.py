"""FSDP on the CPU with gloo, two real processes started by ``accelerate launch`` with the config the
studio writes (one launch, shared by the module; the rank's code is tests/fsdp_cpu_rank.py).

What it proves: (1) torch's FSDP, configured from that config exactly as accelerate would
(FULL_SHARD, PEFT's wrap policy on the model's decoder-layer class, use_orig_params off), shards
the studio's LoRA model over two CPU processes and trains it to the same adapter as one unsharded
process on the whole batch; (2) accelerate (1.15) itself does *not* run FSDP on CPUs: the
``Accelerator`` the worker's Trainer builds there fails ("There are currently no available devices
found": the FSDP plugin wants a GPU for ``sync_module_states``), and without that setting it is
MULTI_CPU without an FSDP plugin. That is why
``strategy.refusal`` refuses ``fsdp`` without CUDA; if a later accelerate changes this, test (2)
fails and the refusal can go."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import module_home
from studio.distributed import strategy
from studio.distributed.layers import decoder_layer_class

RANK_SCRIPT = Path(__file__).with_name("fsdp_cpu_rank.py")


@pytest.fixture(scope="module")
def facts(tmp_path_factory, tiny_chat_model):
    home_iter = module_home(tmp_path_factory, "fsdp-cpu-home")
    home = next(home_iter)
    try:
        folder = tmp_path_factory.mktemp("fsdp-cpu-run")
        layer = decoder_layer_class(str(tiny_chat_model))  # the child process + cache, as a launch does
        run = type("Spec", (), {"distributed": "fsdp", "offload": False, "nproc_per_node": 2,
                                "model": str(tiny_chat_model), "trust_remote_code": False})()
        config = strategy.write_configs(run, folder, processes=2, precision="fp32", layer_class=layer)
        out = folder / "facts.json"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", "2", str(RANK_SCRIPT), str(out), str(tiny_chat_model)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PEFT_STUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1",
               "PYTHONWARNINGS": "ignore"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher leads its own session: every rank goes
            log, _ = proc.communicate()
            pytest.fail(f"the FSDP launch did not finish in 300 s:\n{log[-4000:]}")
        assert proc.returncode == 0 and out.is_file(), _errors(log)
        data = json.loads(out.read_text())
        data["layer_class"] = layer
        return data
    finally:
        next(home_iter, None)


def test_accelerate_cannot_run_fsdp_on_cpus(facts):
    assert "no available devices found" in facts["accelerator_error"]  # the worker's own error
    assert "MULTI_CPU" in facts["distributed_type"]  # and without sync_module_states: plain DDP
    assert facts["fsdp_plugin"] is False
    reason = strategy.refusal(type("S", (), {"distributed": "fsdp", "offload": False})(), "cpu", 2)
    assert "MULTI_CPU" in reason


def test_fsdp_shards_and_trains_lora_on_cpus_with_gloo_like_one_process(facts):
    assert facts["layer_class"] == "LlamaDecoderLayer"
    lora = facts["lora"]
    plugin = lora["plugin"]
    assert "FULL_SHARD" in plugin["sharding_strategy"] and plugin["use_orig_params"] is False
    assert "FULL_STATE_DICT" in plugin["state_dict_type"] and plugin["wrap"] == ["LlamaDecoderLayer"]
    _sharded_like_one_process(lora)


def test_fsdp_shards_qlora_with_its_4bit_weights_stored_in_the_load_dtype(facts):
    """QLoRA + FSDP: with WORLD_SIZE 2 and distributed fsdp the worker's model has one dtype
    (bitsandbytes' packed weights stored as float32, no fp32 casts of the rest), so FSDP flattens
    it, and sharded training equals one process on the whole batch."""
    qlora = facts["qlora"]
    assert qlora["dtypes"] == ["torch.float32"], qlora["dtypes"]
    _sharded_like_one_process(qlora)


def _sharded_like_one_process(run: dict) -> None:
    # PEFT's policy: the root, the 2 decoder blocks and every LoRA Linear (A and B) as a unit of its own
    assert run["units"] == 1 + 2 + run["lora_tensors"], run["units"]
    half = run["total_numel"] / 2
    assert half <= run["local_numel"] <= half + run["units"] * 2, (run["local_numel"], half)
    assert run["lora_tensors"] > 0 and run["lora_b_sum"] > 0  # B starts at 0: the adapter trained
    assert run["losses"] == pytest.approx(run["reference_losses"], abs=1e-5)
    assert run["lora_max_diff"] < 1e-5


def _errors(log: str) -> str:
    """The ranks' tracebacks first (the launcher's own report repeats them at the end)."""
    lines = [line for line in log.splitlines() if line.startswith("[rank")]
    return "\n".join(lines[-80:]) + "\n...\n" + log[-3000:]
