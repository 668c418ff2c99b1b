"""FSDP and DeepSpeed ZeRO-2/3 runs: the accelerate config the studio writes, and its launch.

A run whose ``distributed`` is ``fsdp``, ``zero2`` or ``zero3`` is started as ``accelerate launch
--config_file <run folder>/accelerate_config.yaml --num_processes N -m studio.worker RUN_ID``:
accelerate turns the config into the environment its plugins read (``ACCELERATE_USE_FSDP``,
``FSDP_*``, ``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_DEEPSPEED_CONFIG_FILE``) and starts the
ranks through ``torch.distributed.run``; inside the worker, transformers' ``Trainer`` builds its
``Accelerator`` from that environment, so the worker has no FSDP or DeepSpeed code of its own.

What is written, and why (each from the engine's own documentation):

* FSDP (PEFT's "Use PEFT and FSDP" guide, ``docs/source/accelerate/fsdp.md``): FSDP1,
  ``FULL_SHARD``, ``TRANSFORMER_BASED_WRAP`` on the model's decoder-layer class
  (``layers.decoder_layer_class``; transformers' Trainer then swaps in PEFT's
  ``fsdp_auto_wrap_policy``, which also wraps every trainable adapter Linear as its own unit),
  ``use_orig_params: false`` (PEFT: needed for the memory saving; the separate adapter units keep
  each flat parameter uniformly trainable or frozen), ``sync_module_states`` (rank 0's weights
  broadcast at wrapping), ``BACKWARD_PRE`` prefetch, and
  ``FULL_STATE_DICT``: transformers' ``Trainer.save_model`` writes nothing under FSDP unless the
  state dict type is full, and an adapter's full state dict is small. ``offload`` sets
  ``fsdp_offload_params`` (sharded parameters, their gradients and the optimizer step on the CPU).
* ZeRO (DeepSpeed's config schema, with transformers' ``"auto"`` values, which ``Trainer`` fills
  from its own arguments: batch sizes, accumulation, clipping, bf16/fp16): ``deepspeed.json``
  beside the YAML, referenced as ``deepspeed_config_file``. The YAML then carries no
  ``mixed_precision`` and none of the DeepSpeed keys accelerate refuses next to a config file
  (``DeepSpeedPlugin._deepspeed_config_checks``). ``offload`` moves the optimizer (ZeRO-2/3)
  and the parameters (ZeRO-3) to the CPU; ZeRO-3 gathers 16-bit weights on save so the adapter
  is written whole. Multi-node runs use accelerate's ``standard`` launcher (torchrun on each
  node, no ssh/pdsh).
* QLoRA: FSDP and ZeRO-3 shard a 4-bit base only when bitsandbytes stores the packed weights in
  a float type (``bnb_4bit_quant_storage``) equal to the type the rest of the model is loaded in
  and nothing is cast to fp32 before wrapping (PEFT's FSDP/DeepSpeed QLoRA guides): the worker
  does both when ``flattens_parameters`` (``worker.prepare.build_model``, ``methods.qlora``);
  ``quant_storage_dtype`` is the load dtype a precision gets.

Where the engines cannot run, the run is refused with the reason (``refusal``): ZeRO needs the
``deepspeed`` package and CUDA; FSDP needs CUDA too, in accelerate 1.15 (measured:
tests/test_strategy_fsdp_cpu.py): on CPUs its FSDP plugin fails in the worker ("There are
currently no available devices found": ``sync_module_states`` asks for a GPU device), and even
without that setting ``AcceleratorState`` enables FSDP only for GPU-type distributed types, so a
CPU launch is ``MULTI_CPU``, plain DDP. Torch's FSDP itself runs on CPUs with gloo (the same test
trains the studio's LoRA model so, from this config).
``peft-studio job export`` writes the same config for a GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
SHARDED = ("fsdp", "zero2", "zero3")  # the strategies started through accelerate with a config
ACCELERATE_CONFIG = "accelerate_config.yaml"
DEEPSPEED_CONFIG = "deepspeed.json"
JOB_EXPORT_HINT = ("train it here with ddp and take it to GPUs with `peft-studio job export RUN_ID "
                   "--nodes N --gpus-per-node G --distributed fsdp|zero2|zero3 [--offload]`, which "
                   "writes the accelerate config for them")


class StrategyError(ValueError):
    """A strategy this run or machine cannot use; the message names the setting and why."""


def choices(spec: Any) -> tuple[str, bool, int]:
    """(strategy, offload, processes per node as set: 0 = automatic) of a RunSpec; a spec from
    before these fields existed is a plain DDP run."""
    return (getattr(spec, "distributed", "ddp"), bool(getattr(spec, "offload", False)),
            int(getattr(spec, "nproc_per_node", 0) or 0))


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def refusal(spec: Any, device_kind: str, processes: int, has_deepspeed: bool | None = None) -> str | None:
    """Why ``spec``'s strategy cannot run with ``processes`` processes on ``device_kind`` ("cuda"
    or "cpu"), or None. One reason, starting with the RunSpec field it is about."""
    strategy, offload, _ = choices(spec)
    if strategy not in STRATEGIES:
        return f"runspec 'distributed': must be one of {', '.join(STRATEGIES)} (got {strategy!r})"
    if offload and strategy == "ddp":
        return ("runspec 'offload': only FSDP and ZeRO shard their states, so only they can offload "
                "them to the CPU; choose distributed fsdp, zero2 or zero3, or turn offload off")
    if strategy == "ddp":
        return None
    if processes < 2:
        return (f"runspec 'distributed': {strategy} shards the model's states across processes, and "
                f"this run has {processes}: set nproc_per_node to 2 or more, or use ddp")
    if strategy.startswith("zero"):
        has_deepspeed = deepspeed_available() if has_deepspeed is None else has_deepspeed
        missing = [what for what, ok in (("the deepspeed package (pip install deepspeed; it builds "
                                          "CUDA kernels)", has_deepspeed),
                                         ("CUDA GPUs (DeepSpeed's ZeRO runs on NCCL)", device_kind == "cuda"))
                   if not ok]
        if missing:
            return (f"runspec 'distributed': {strategy} needs {' and '.join(missing)}; "
                    f"{JOB_EXPORT_HINT}")
        return None
    if device_kind != "cuda":  # fsdp
        return ("runspec 'distributed': fsdp needs CUDA GPUs: on CPUs accelerate's FSDP plugin stops "
                "with 'no available devices found', and its CPU mode (MULTI_CPU) is plain DDP, which "
                f"would shard nothing. Use ddp on the CPU (gloo); {JOB_EXPORT_HINT}")
    return None


def flattens_parameters(spec: Any, world_size: int) -> bool:
    """True when the run's engine will flatten each wrapped unit's parameters into one tensor of
    one dtype (FSDP, ZeRO-3; ZeRO-2 shards only gradients and optimizer state): the worker then
    stores a 4-bit base's packed weights in the load dtype (``bnb_4bit_quant_storage``) and casts
    nothing to fp32 before wrapping (``ApplyContext.sharded``)."""
    return world_size > 1 and choices(spec)[0] in ("fsdp", "zero3")


def quant_storage_dtype(precision: str) -> str:
    """``bnb_4bit_quant_storage`` (and the load dtype) for a 4-bit base under FSDP or ZeRO-3:
    PEFT's guide: bfloat16 for bf16 training, float32 for fp16 mixed precision (stable loss
    scaling) and for fp32."""
    return "bfloat16" if precision == "bf16" else "float32"


def mixed_precision(precision: str) -> str:
    """accelerate's ``mixed_precision`` for the precision a run trains in (``run_setup``)."""
    return {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no")


RAM_EFFICIENT_LOADING = False


def fsdp_section(layer_class: str | None, offload: bool) -> dict[str, Any]:
    """accelerate's ``fsdp_config`` for a PEFT run (module docstring: why each value)."""
    section: dict[str, Any] = {
        "fsdp_version": 1,
        "fsdp_sharding_strategy": "FULL_SHARD",
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_forward_prefetch": False,
        "fsdp_use_orig_params": False,
        # RAM-efficient loading (PEFT's guide turns it on) makes transformers load the weights on
        # rank 0 only and leave the other ranks' models on the meta device, which the worker's
        # load_model(device="cuda") cannot move; until the worker leaves placement to FSDP under
        # this strategy, every rank loads the whole model and FSDP shards it at wrapping.
        "fsdp_cpu_ram_efficient_loading": RAM_EFFICIENT_LOADING,
        "fsdp_sync_module_states": True,
        "fsdp_offload_params": bool(offload),
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_activation_checkpointing": False,  # the run's own grad_checkpointing does it
    }
    if layer_class:  # else accelerate and PEFT fall back to the model's _no_split_modules
        section["fsdp_transformer_layer_cls_to_wrap"] = layer_class
    return section


def deepspeed_json(stage: int, offload: bool) -> dict[str, Any]:
    """DeepSpeed's config for ZeRO ``stage`` 2 or 3; ``"auto"`` values are filled by transformers'
    ``HfTrainerDeepSpeedConfig`` from the run's TrainingArguments."""
    cpu = {"device": "cpu", "pin_memory": True}
    none = {"device": "none"}
    zero: dict[str, Any] = {
        "stage": stage,
        "offload_optimizer": cpu if offload else none,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 3:
        zero.update({
            "offload_param": cpu if offload else none,
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_gather_16bit_weights_on_model_save": True,  # the adapter saved whole
        })
    return {
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    }


def accelerate_config(strategy: str, processes: int, machines: int = 1, precision: str = "fp32",
                      offload: bool = False, layer_class: str | None = None,
                      deepspeed_file: str | None = None) -> dict[str, Any]:
    """The accelerate config (a dict, written as YAML) for ``processes`` ranks in all over
    ``machines`` nodes. The rendezvous (machine rank, main process address) is given on the
    command line by whoever starts each node (``peft-studio job``); on one machine port 0 lets
    accelerate pick a free port."""
    if strategy not in SHARDED:
        raise StrategyError(f"runspec 'distributed': {strategy!r} is not started through accelerate "
                            f"(one of {', '.join(SHARDED)})")
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "downcast_bf16": "no",
        "machine_rank": 0,
        "main_training_function": "main",
        "num_machines": int(machines),
        "num_processes": int(processes),
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if machines == 1:
        config["main_process_port"] = 0
    if strategy == "fsdp":
        config["distributed_type"] = "FSDP"
        config["mixed_precision"] = mixed_precision(precision)
        config["fsdp_config"] = fsdp_section(layer_class, offload)
    else:
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "deepspeed_config_file": deepspeed_file or DEEPSPEED_CONFIG,
            "deepspeed_multinode_launcher": "standard",
            # deepspeed.zero.Init: ZeRO-3 builds the model already partitioned (PEFT's QLoRA guide)
            "zero3_init_flag": strategy == "zero3",
        }
    return config


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)  # never a half-written config beside a starting launcher


def write_configs(spec: Any, folder: Path, processes: int, machines: int = 1, precision: str = "fp32",
                  layer_class: str | None = None, deepspeed_ref: str | None = None) -> Path:
    """Write ``accelerate_config.yaml`` (and ``deepspeed.json`` for ZeRO) into ``folder`` for
    ``spec``'s strategy; returns the YAML's path. ``deepspeed_ref``: how the YAML names the JSON
    (default: its absolute path; a job folder that moves passes a path relative to where its
    launch script runs). ``layer_class``: FSDP's wrap unit (read from the model when None)."""
    import yaml

    strategy, offload, _ = choices(spec)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ds_file = None
    if strategy.startswith("zero"):
        ds_path = folder / DEEPSPEED_CONFIG
        _write(ds_path, json.dumps(deepspeed_json(int(strategy[-1]), offload), indent=2) + "\n")
        ds_file = deepspeed_ref or str(ds_path.resolve())
    elif strategy == "fsdp" and layer_class is None:
        import subprocess

        from studio.distributed.layers import LayerClassError, decoder_layer_class

        try:
            layer_class = decoder_layer_class(spec.model, getattr(spec, "trust_remote_code", False))
        except (LayerClassError, subprocess.TimeoutExpired, OSError) as exc:
            # A model this machine cannot read now (a hub id offline, for a job): the key is left
            # out and accelerate and PEFT wrap the model's own _no_split_modules, which names
            # the decoder layer in every transformers model.
            print(f"FSDP wrap class not written ({exc}); the model's _no_split_modules will be used",
                  file=sys.stderr)
    config = accelerate_config(strategy, processes, machines, precision, offload, layer_class, ds_file)
    path = folder / ACCELERATE_CONFIG
    _write(path, yaml.safe_dump(config, sort_keys=True))
    return path


def export_configs(spec: Any, folder: Path, nodes: int, gpus_per_node: int,
                   layer_class: str | None = None) -> Path | None:
    """The config of a job for a GPU cluster (``peft-studio job export``): ``nodes`` ×
    ``gpus_per_node`` ranks, written on a machine that may have neither GPUs nor DeepSpeed, so
    only the spec's own refusals apply (``StrategyError``). None for DDP (no config). The YAML
    names DeepSpeed's JSON by its bare file name: the job's launch script passes
    ``--deepspeed_config_file "$RUN_DIR/deepspeed.json"``, which accelerate prefers to the file's
    value. Precision ``auto`` is planned as bf16 (every current data-centre GPU has it); the worker
    still decides on the cluster, and a GPU without bf16 should set the run's precision."""
    strategy, _, _ = choices(spec)
    if strategy == "ddp":
        return None
    processes = int(nodes) * int(gpus_per_node)
    reason = refusal(spec, "cuda", processes, has_deepspeed=True)
    if reason:
        raise StrategyError(reason)
    precision = "bf16" if spec.precision == "auto" else spec.precision
    return write_configs(spec, folder, processes, machines=int(nodes), precision=precision,
                         layer_class=layer_class, deepspeed_ref=DEEPSPEED_CONFIG)


def local_processes(spec: Any) -> int:
    """The ranks a run starts on this machine: ``nproc_per_node``, or every visible GPU (at
    least 1) when it is 0 (automatic)."""
    _, _, nproc = choices(spec)
    if nproc > 0:
        return nproc
    from studio.runs.launch import _cuda_device_count  # the one GPU count the launcher uses

    return max(1, _cuda_device_count())


def run_precision(spec: Any) -> str:
    """The precision the worker will train in on this machine (``run_setup``'s rule), for the
    config's ``mixed_precision``; no torch in this process."""
    from studio import run_setup

    try:
        device = run_setup.device_facts(spec.model)
        return run_setup.choose_precision(spec.precision, device)[0]
    except Exception:  # the worker refuses an impossible precision itself, with its reason
        return "fp32"


def launch_command(spec: Any, run_folder: Path, run_id: int, resume: bool) -> list[str]:
    """The command that starts run ``run_id`` under its FSDP / ZeRO strategy on this machine,
    after writing its config into ``run_folder`` (the contract with ``runs/launch._command``)."""
    strategy, _, _ = choices(spec)
    processes = local_processes(spec)
    device = "cuda" if processes and _has_gpu() else "cpu"
    reason = refusal(spec, device, processes)
    if reason:
        raise StrategyError(reason)
    config = write_configs(spec, Path(run_folder), processes, precision=run_precision(spec))
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(processes), "-m", "studio.worker", str(run_id),
            *(["--resume"] if resume else [])]


def _has_gpu() -> bool:
    from studio.runs.launch import _cuda_device_count

    return _cuda_device_count() > 0
