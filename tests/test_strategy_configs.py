"""The accelerate / DeepSpeed configs the studio writes for FSDP and ZeRO-2/3, read back by the
engines' own parsers: accelerate's ``load_config_from_file``, its launcher's argument handling
(``_validate_launch_command``, ``prepare_multi_gpu_env`` / ``prepare_deepspeed_cmd_env``: the
environment ``accelerate launch`` gives the worker), the ``FullyShardedDataParallelPlugin`` and
``DeepSpeedPlugin`` the worker's Trainer builds from that environment, whose own filling must
resolve every ``"auto"``. DeepSpeed and NCCL are not on this machine: these are the checks that
can run here; the launch itself is documented."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from studio.distributed import strategy


def spec(distributed: str, offload: bool = False, nproc: int = 0, model: str = "m", method: str = "lora"):
    return SimpleNamespace(distributed=distributed, offload=offload, nproc_per_node=nproc, model=model,
                           method=method, precision="auto", trust_remote_code=False)


def launcher_env(yaml_path, monkeypatch, extra: tuple[str, ...] = ()):
    """What ``accelerate launch --config_file yaml -m studio.worker 7`` sets for its ranks: the
    launcher's own parsing, run as ``accelerate.commands.launch.launch_command`` runs it, up to
    starting the processes. The variables are set here, as the ranks would inherit them."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(yaml_path), *extra,
                                               "-m", "studio.worker", "7"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    assert args.module and args.training_script == "studio.worker" and args.training_script_args == ["7"]
    if args.use_deepspeed:  # as launch_command does before deepspeed_launcher
        fields = list(defaults.deepspeed_config.keys()) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        cmd, env = prepare_deepspeed_cmd_env(args)
        assert cmd is None  # one node, or the 'standard' launcher: torchrun, no pdsh/ssh
    else:
        env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    return args, env


@pytest.mark.parametrize("offload", [False, True])
def test_fsdp_config_is_what_accelerate_and_its_fsdp_plugin_read(tmp_path, monkeypatch, offload):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy, StateDictType

    path = strategy.write_configs(spec("fsdp", offload), tmp_path, processes=4, precision="bf16",
                                  layer_class="LlamaDecoderLayer")
    assert path == tmp_path / "accelerate_config.yaml" and not (tmp_path / "deepspeed.json").exists()
    loaded = load_config_from_file(str(path))
    assert loaded.distributed_type == "FSDP" and loaded.num_processes == 4 and loaded.num_machines == 1
    assert loaded.mixed_precision == "bf16" and loaded.use_cpu is False

    args, env = launcher_env(path, monkeypatch)
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true" and args.nproc_per_node == "4"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    # With sync_module_states the plugin asks for the current accelerator device (for its
    # param_init_fn) and raises on a machine without one: pretend CUDA for that question only.
    import accelerate.utils.dataclasses as accelerate_dataclasses
    import torch

    monkeypatch.setattr(accelerate_dataclasses, "is_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plugin = FullyShardedDataParallelPlugin()  # from the environment, as the worker's Accelerator does
    assert plugin.fsdp_version == 1
    assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.use_orig_params is False and plugin.sync_module_states is True
    assert plugin.cpu_ram_efficient_loading is strategy.RAM_EFFICIENT_LOADING  # see fsdp_section
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT  # Trainer.save_model writes the adapter
    assert plugin.backward_prefetch == BackwardPrefetch.BACKWARD_PRE
    assert plugin.cpu_offload.offload_params is offload


@pytest.mark.parametrize("stage,offload", [(2, False), (2, True), (3, False), (3, True)])
def test_zero_configs_pass_accelerate_and_its_deepspeed_plugin(tmp_path, monkeypatch, stage, offload):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    # A job for 2 nodes x 4 GPUs, written on this machine (no GPU, no deepspeed): the YAML names the
    # JSON by its file name and the job's launch script passes its path, as here.
    path = strategy.export_configs(spec(f"zero{stage}", offload), tmp_path, nodes=2, gpus_per_node=4)
    ds_path = tmp_path / "deepspeed.json"
    loaded = load_config_from_file(str(path))
    assert loaded.distributed_type == "DEEPSPEED" and loaded.num_processes == 8 and loaded.num_machines == 2
    assert loaded.deepspeed_config["deepspeed_config_file"] == "deepspeed.json"
    assert loaded.mixed_precision is None  # bf16 lives in the JSON ("auto" from the Trainer)

    extra = ("--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "29400",
             "--deepspeed_config_file", str(ds_path.resolve()))
    args, env = launcher_env(path, monkeypatch, extra)
    assert args.use_deepspeed and env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(ds_path.resolve())
    plugin = DeepSpeedPlugin()  # what TrainingArguments builds from ACCELERATE_USE_DEEPSPEED
    assert plugin.zero_stage == stage
    assert plugin.offload_optimizer_device == ("cpu" if offload else "none")
    if stage == 3:
        assert plugin.offload_param_device == ("cpu" if offload else "none")
        assert plugin.zero3_init_flag is True and plugin.zero3_save_16bit_model is True

    # Every "auto" is resolvable by accelerate's own filling (Accelerator._prepare_deepspeed, with
    # the values it passes for a batch of 4, 2 accumulation steps and a 4096-wide model; the
    # worker's Trainer fills the same keys from its arguments first). transformers' own
    # HfTrainerDeepSpeedConfig cannot be built without deepspeed installed.
    plugin.set_mixed_precision("bf16")  # what TrainingArguments does with the run's precision
    d = 4096
    plugin.deepspeed_config_process(must_match=False, **{
        "gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 4, "train_batch_size": 4 * 2 * 8,
        "gradient_accumulation_steps": 2, "zero_optimization.reduce_bucket_size": d * d,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * d * d),
        "zero_optimization.stage3_param_persistence_threshold": 10 * d})
    text = json.dumps(plugin.deepspeed_config)
    assert '"auto"' not in text, text
    assert plugin.deepspeed_config["bf16"]["enabled"] is True
    assert plugin.deepspeed_config["zero_optimization"]["reduce_bucket_size"] == d * d
    # A run on this machine names the JSON by its absolute path (the launcher runs from anywhere).
    local = strategy.write_configs(spec(f"zero{stage}", offload), tmp_path / "run", processes=2, precision="bf16")
    assert load_config_from_file(str(local)).deepspeed_config["deepspeed_config_file"] == \
        str((tmp_path / "run" / "deepspeed.json").resolve())


def test_what_cannot_run_here_is_refused_with_the_reason():
    no_gpu = strategy.refusal(spec("zero3"), "cpu", 2, has_deepspeed=False)
    assert no_gpu.startswith("runspec 'distributed': zero3 needs the deepspeed package")
    assert "CUDA GPUs" in no_gpu and "peft-studio job export" in no_gpu
    ds_only = strategy.refusal(spec("zero2"), "cuda", 2, has_deepspeed=False)
    assert "the deepspeed package" in ds_only and "CUDA GPUs (" not in ds_only
    assert strategy.refusal(spec("zero2"), "cuda", 2, has_deepspeed=True) is None
    fsdp_cpu = strategy.refusal(spec("fsdp"), "cpu", 2)
    assert "fsdp needs CUDA GPUs" in fsdp_cpu and "MULTI_CPU" in fsdp_cpu and "ddp" in fsdp_cpu
    assert strategy.refusal(spec("fsdp"), "cuda", 2) is None
    assert "set nproc_per_node to 2 or more" in strategy.refusal(spec("fsdp"), "cuda", 1)
    assert strategy.refusal(spec("ddp", offload=True), "cuda", 2).startswith("runspec 'offload'")
    assert strategy.refusal(spec("ddp"), "cpu", 2) is None
    assert "must be one of ddp, fsdp, zero2, zero3" in strategy.refusal(spec("zero1"), "cuda", 2)
    # QLoRA shards too: the worker stores the 4-bit weights in the load dtype (fsdp_cpu_rank.py)
    assert strategy.refusal(spec("fsdp", method="qlora"), "cuda", 2) is None
    assert strategy.refusal(spec("zero3", method="qlora"), "cuda", 2, has_deepspeed=True) is None
    assert strategy.flattens_parameters(spec("fsdp"), 2) and strategy.flattens_parameters(spec("zero3"), 4)
    assert not strategy.flattens_parameters(spec("zero2"), 2) and not strategy.flattens_parameters(spec("fsdp"), 1)
    assert strategy.quant_storage_dtype("bf16") == "bfloat16" and strategy.quant_storage_dtype("fp16") == "float32"


def test_launch_command_writes_the_config_and_accelerate_accepts_the_command(tmp_path, monkeypatch,
                                                                           tiny_llama_dir):
    """The command ``runs/launch._command`` runs for an FSDP run: its arguments parsed by
    accelerate's own launcher parser, the config beside it. Only the GPU count is pretended (this
    machine has none); the wrap class comes from the cache a first launch writes (the child
    process that reads it from the model runs in test_strategy_fsdp_cpu.py)."""
    import json as json_module

    from accelerate.commands.launch import launch_command_parser
    from studio import config
    from studio.runs import launch

    monkeypatch.setattr(launch, "_cuda_device_count", lambda: 2)
    monkeypatch.setattr(strategy, "run_precision", lambda spec: "bf16")
    source = str(tiny_llama_dir)
    config.model_fact_file(source, ".layer.json").write_text(json_module.dumps(
        {"source": source, "stamp": config.model_stamp(source), "layer_class": "LlamaDecoderLayer"}))
    run = spec("fsdp", model=source)
    cmd = strategy.launch_command(run, tmp_path, 5, resume=True)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(cmd[3:])
    assert args.config_file == str(tmp_path / "accelerate_config.yaml") and args.num_processes == 2
    assert args.module and args.training_script == "studio.worker"
    assert args.training_script_args == ["5", "--resume"]
    text = (tmp_path / "accelerate_config.yaml").read_text()
    assert "fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer" in text
    assert "mixed_precision: bf16" in text
    if not strategy.deepspeed_available():  # refused before anything is written or started
        with pytest.raises(strategy.StrategyError, match="zero2 needs the deepspeed package"):
            strategy.launch_command(spec("zero2", model=str(tiny_llama_dir)), tmp_path / "z", 5, resume=False)
        assert not (tmp_path / "z").exists()


def test_a_strategy_this_machine_cannot_run_is_refused_before_a_run_row(db):
    """``peft-studio train`` and the Train tab create the row through ``launch.create_run``: on
    this CPU machine (no GPU, no deepspeed) ZeRO and FSDP are refused there with the reason, and
    nothing is written; DDP with two processes is accepted (gloo)."""
    from studio import projects
    from studio.runs import launch
    from studio.runspec import RunSpec, RunSpecError

    if launch._cuda_device_count() or strategy.deepspeed_available():
        pytest.skip("this check is for a machine without GPUs or deepspeed")
    project = projects.create_project(db, "strategies")
    for distributed, reason in (("zero3", "zero3 needs the deepspeed package"), ("fsdp", "fsdp needs CUDA GPUs")):
        spec = RunSpec(model="m", sample_task="dates", nproc_per_node=2, distributed=distributed)
        with pytest.raises(RunSpecError, match=reason):
            launch.create_run(db, project.id, spec)
    assert db.list_runs(project.id) == []
    run = launch.create_run(db, project.id, RunSpec(model="m", sample_task="dates", nproc_per_node=2))
    assert db.get_run(run.id).spec["distributed"] == "ddp"
