"""One rank of the CPU FSDP check (tests/test_strategy_fsdp_cpu.py), started by ``accelerate launch``
with the config ``studio.distributed.strategy`` writes: ``fsdp_cpu_rank.py OUT.json MODEL``.

1. What the worker's Trainer would get on a CPU: ``Accelerator(cpu=True)`` (Trainer's
   ``use_cpu``) under this FSDP launch. Recorded, not assumed: accelerate 1.15's FSDP plugin
   raises for want of a GPU device (``sync_module_states``), and without that setting the
   launch is MULTI_CPU with no FSDP plugin: why ``strategy.refusal`` refuses FSDP on CPUs.
2. The FSDP engine itself on the CPU with gloo, configured exactly as the config says (the
   ``FullyShardedDataParallelPlugin`` built from the launcher's environment, PEFT's
   ``fsdp_auto_wrap_policy`` as transformers' Trainer installs it), over the studio's own LoRA
   model (``worker.prepare.build_model``), LoRA and QLoRA (its 4-bit weights stored in fp32, the
   load dtype, as the worker does when FSDP will flatten them): three SGD steps on each rank's
   half of a batch, compared on rank 0 with the same steps of an unsharded copy on the whole batch. One setting differs:
   ``sync_module_states`` (the broadcast from rank 0 that RAM-efficient loading needs), which
   torch's FSDP refuses with parameters on the CPU ("requires them to be on GPU"); every rank
   builds the same model from the same seed here, and the comparison checks they agree.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist


def main(out: str, model_path: str) -> None:
    from accelerate import Accelerator

    torch.set_num_threads(1)
    facts = {}
    try:  # what the worker's Trainer (use_cpu) does under this launch
        Accelerator(cpu=True)
        facts["accelerator_error"] = None
    except RuntimeError as exc:
        facts["accelerator_error"] = str(exc)
    # Even without sync_module_states (the setting that asks for a GPU), a CPU launch is not FSDP.
    os.environ["FSDP_SYNC_MODULE_STATES"] = os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    accelerator = Accelerator(cpu=True)  # initialises the gloo process group
    facts["distributed_type"] = str(accelerator.distributed_type)
    facts["fsdp_plugin"] = getattr(accelerator.state, "fsdp_plugin", None) is not None  # as Trainer reads it
    os.environ["FSDP_SYNC_MODULE_STATES"] = os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
    rank, world = dist.get_rank(), dist.get_world_size()

    facts["lora"] = sharded_training(model_path, "lora", rank, world)
    # QLoRA: the worker stores the 4-bit weights in the load dtype when FSDP will flatten them
    # (``strategy.flattens_parameters``; this launch's WORLD_SIZE is 2 and the spec says fsdp).
    facts["qlora"] = sharded_training(model_path, "qlora", rank, world)
    if rank == 0:
        with open(out, "w", encoding="utf-8") as handle:
            json.dump(facts, handle)
    dist.barrier()


def sharded_training(model_path: str, method: str, rank: int, world: int) -> dict:
    """Three SGD steps of ``method`` sharded over the ranks, against the same steps unsharded on
    the whole batch (rank 0); what each side measured."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from studio.runspec import RunSpec
    from studio.worker import prepare

    facts: dict = {}
    settings = {"r": 8, "lora_dropout": 0.0}
    if method == "qlora":
        settings["bnb_4bit_compute_dtype"] = "float32"
    spec = RunSpec(model=model_path, method=method, method_settings=settings, sample_task="dates",
                   max_length=64, nproc_per_node=2, distributed="fsdp")
    torch.manual_seed(0)
    model, _, _, _ = prepare.build_model(spec, prepare.Compute("cpu", "float32", False, False))
    model.train()  # as the Trainer does (in eval mode bitsandbytes repacks 4-bit weights for inference)
    facts["dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    reference = copy.deepcopy(model) if rank == 0 else None
    # With sync_module_states the plugin asks for the accelerator device (only to build its
    # param_init_fn, unused here: nothing is on the meta device) and raises on a CPU-only machine,
    # a second reason accelerate cannot run FSDP on CPUs. Answer that one question with "CUDA 0".
    import accelerate.utils.dataclasses as accelerate_dataclasses

    accelerate_dataclasses.is_cuda_available = lambda: True
    current_device, torch.cuda.current_device = torch.cuda.current_device, lambda: 0
    plugin = FullyShardedDataParallelPlugin()  # from ACCELERATE_USE_FSDP / FSDP_* set by the launcher
    torch.cuda.current_device = current_device
    facts["plugin"] = {"sharding_strategy": str(plugin.sharding_strategy), "use_orig_params": plugin.use_orig_params,
                       "state_dict_type": str(plugin.state_dict_type),
                       "wrap": plugin.transformer_cls_names_to_wrap}
    sharded = FSDP(model, sharding_strategy=plugin.sharding_strategy, auto_wrap_policy=fsdp_auto_wrap_policy(model),
                   use_orig_params=plugin.use_orig_params, sync_module_states=False,  # see below
                   backward_prefetch=plugin.backward_prefetch, cpu_offload=plugin.cpu_offload,
                   device_id=torch.device("cpu"))
    facts["units"] = sum(isinstance(m, FSDP) for m in sharded.modules())
    facts["local_numel"] = sum(p.numel() for p in sharded.parameters())  # this rank's shards
    facts["total_numel"] = sum(p.numel() for p in reference.parameters()) if reference is not None else None

    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(3, 500, (2 * world, 32), generator=generator)  # every rank draws the same batch
    mine = batch[2 * rank: 2 * rank + 2]
    def over_the_batch(loss: torch.Tensor) -> float:
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # the step's loss over the whole batch (equal-length rows)
        return mean.item() / world

    facts["losses"] = sgd_steps(sharded, mine, over_the_batch)

    with FSDP.state_dict_type(sharded, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=False, rank0_only=True)):
        full = sharded.state_dict()
    if rank == 0:
        ref_losses = sgd_steps(reference, batch, lambda loss: loss.item())
        ref_state = reference.state_dict()
        lora = [k for k in full if "lora_" in k]
        facts["reference_losses"] = ref_losses
        facts["lora_tensors"] = len(lora)
        facts["lora_max_diff"] = max((full[k] - ref_state[k]).abs().max().item() for k in lora)
        facts["lora_b_sum"] = sum(full[k].abs().sum().item() for k in lora if "lora_B" in k)  # 0 at init
    return facts




def sgd_steps(model, ids: torch.Tensor, loss_value, steps: int = 3) -> list[float]:
    """``steps`` SGD steps (lr 0.5) of ``model`` on ``ids`` (labels = inputs); each step's loss
    as ``loss_value`` reads it."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss_value(loss))
    return losses


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
