"""Training on more than one process: the engines' configs and what they cost per GPU.

``strategy.py`` writes the accelerate config (and DeepSpeed's JSON) for FSDP and ZeRO-2/3 and
builds the ``accelerate launch`` command the supervisor starts; ``layers.py`` names a model's
decoder-layer class (the FSDP wrap unit) from a child process, so the UI never imports torch;
``memory.py`` is the estimate's per-GPU arithmetic for each strategy (ZeRO's Ψ formulas). DDP
itself needs no config: ``torch.distributed.run`` starts it (``studio/runs/launch.py``).
Nothing here imports torch.
"""
