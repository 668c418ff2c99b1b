"""The text of a job folder's ``launch.sh``, ``job.sbatch`` and ``README.txt``.

``launch.sh`` starts one node's share of the job with the launcher made for it: ``torchrun``
(``python -m torch.distributed.run``, the same module ``torchrun`` runs) with a c10d rendezvous
for DDP, ``accelerate launch`` with the run's written config for FSDP and DeepSpeed ZeRO. The
rendezvous host, port and id are options (and environment variables, which SLURM's script sets),
with defaults for one node; ``--print`` shows the command without running it. Before the
launcher, the first node runs ``studio.jobs.preflight`` (the model named in MODEL, checkpoint
paths after the folder moved). ``job.sbatch`` runs ``launch.sh`` once per node through ``srun``,
with the first node's hostname as the rendezvous endpoint.

Every value that comes from the user (the model, names) is quoted with ``shlex.quote``.
"""

from __future__ import annotations

import shlex

from studio.jobs.manifest import Manifest

DEFAULT_PORT = 29500  # torchrun's own default master port
ACCELERATE_CONFIG = "accelerate_config.yaml"  # studio.distributed.strategy writes it in the run folder


def _line(text: str) -> str:
    """A name on one comment line (a newline in a run name would end the comment)."""
    return " ".join(str(text).split())


def launcher(m: Manifest) -> str:
    """The bash array ``CMD`` that starts this node's processes."""
    worker = f"-m studio.worker {m.run_id} ${{RESUME:+--resume}}"
    if m.distributed in ("fsdp", "zero2", "zero3"):
        # accelerate's own multi-machine options; its config (written by the studio) holds the
        # strategy, and these override its machine counts for this cluster. DeepSpeed's default
        # multi-node launcher is pdsh over ssh from the first node; "standard" is one launch per
        # node, as srun (or the user) does here.
        # The YAML names deepspeed.json by its bare name (strategy.export_configs): its path here.
        ds = (' --deepspeed_config_file "$RUN_DIR/deepspeed.json" --deepspeed_multinode_launcher '
              'standard' if m.distributed.startswith("zero") else "")
        return ('CMD=("$PYTHON" -m accelerate.commands.launch --config_file "$RUN_DIR/'
                f'{ACCELERATE_CONFIG}" --num_machines "$NNODES" --num_processes '
                '"$((NNODES * NPROC_PER_NODE))" --machine_rank "$NODE_RANK" --main_process_ip '
                f'"$RDZV_HOST" --main_process_port "$RDZV_PORT"{ds} {worker})')
    return ('CMD=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node '
            '"$NPROC_PER_NODE" --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" '
            f'--rdzv_id "$RDZV_ID" {worker})')


def launch_sh(m: Manifest) -> str:
    return f"""#!/usr/bin/env bash
# PEFT Studio job {m.job_id}: run {m.run_id} ({_line(m.run_name)}) of project {_line(m.project)},
# {m.nodes} node(s) x {m.gpus_per_node} process(es), {m.distributed}. Run it on every node:
#   ./launch.sh [--rdzv-host HOST] [--rdzv-port PORT] [--rdzv-id ID] [--node-rank N] [--resume] [--print]
# (or set RDZV_HOST, RDZV_PORT, RDZV_ID, NODE_RANK; PYTHON names the interpreter with peft-studio).
set -euo pipefail
JOB_DIR="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"

# The base model: the one place to change it (a hub id, or a folder or .gguf file on this cluster).
MODEL="${{PEFT_STUDIO_MODEL:-{shlex.quote(m.model)}}}"

NNODES={m.nodes}
NPROC_PER_NODE={m.gpus_per_node}
RDZV_HOST="${{RDZV_HOST:-127.0.0.1}}"
RDZV_PORT="${{RDZV_PORT:-{DEFAULT_PORT}}}"
RDZV_ID="${{RDZV_ID:-{m.job_id}}}"
NODE_RANK="${{NODE_RANK:-${{SLURM_NODEID:-0}}}}"
PYTHON="${{PYTHON:-python3}}"
RESUME=""
PRINT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rdzv-host) RDZV_HOST="$2"; shift 2 ;;
    --rdzv-port) RDZV_PORT="$2"; shift 2 ;;
    --rdzv-id) RDZV_ID="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --resume) RESUME=1; shift ;;
    --print) PRINT=1; shift ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "launch.sh: unknown option $1 (see ./launch.sh --help)" >&2; exit 2 ;;
  esac
done

# The job's own studio home: its history and files, never the user's.
export PEFT_STUDIO_HOME="$JOB_DIR/home"
RUN_DIR="$PEFT_STUDIO_HOME/projects/{m.project_folder}/runs/{m.run_folder}"
{launcher(m)}
if [ -n "$PRINT" ]; then printf '%q ' "${{CMD[@]}}"; echo; exit 0; fi

LOG="$RUN_DIR/worker.log"
if [ "$NODE_RANK" = 0 ]; then
  "$PYTHON" -m studio.jobs.preflight --model "$MODEL" ${{RESUME:+--resume}}
else
  LOG="$RUN_DIR/worker-node$NODE_RANK.log"
fi
exec > >(tee -a "$LOG") 2>&1
# The launcher runs as a child so that its end can be recorded: a job killed (a rank's kill -9,
# a lost node) is marked failed in its history instead of staying "running" with no one to say.
# A SIGTERM or Ctrl-C here is passed on as SIGTERM: every rank stops and saves at the step's end.
"${{CMD[@]}}" &
CHILD=$!
trap 'kill -TERM "$CHILD" 2>/dev/null' TERM INT
CODE=0
wait "$CHILD" || CODE=$?
while kill -0 "$CHILD" 2>/dev/null; do CODE=0; wait "$CHILD" || CODE=$?; done  # after a trapped signal
if [ "$CODE" != 0 ] && [ "$NODE_RANK" = 0 ]; then
  "$PYTHON" -m studio.jobs.preflight --ended "$CODE" || true
fi
exit "$CODE"
"""


def sbatch(m: Manifest) -> str:
    return f"""#!/bin/bash
# PEFT Studio job {m.job_id} for SLURM: {m.nodes} node(s) x {m.gpus_per_node} GPU(s). From the job folder:
#   sbatch job.sbatch        (add your site's --partition / --account / --time here or on the command line)
#SBATCH --job-name=peft-studio-run-{m.run_id}
#SBATCH --nodes={m.nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={m.gpus_per_node}
#SBATCH --output=slurm-%j.out
set -euo pipefail
JOB_DIR="${{SLURM_SUBMIT_DIR:-$(pwd)}}"  # sbatch runs a copy of this script: the folder is where it was submitted
[ -x "$JOB_DIR/launch.sh" ] || {{ echo "submit job.sbatch from the job folder (no launch.sh in $JOB_DIR)" >&2; exit 2; }}
# The rendezvous: the first node of the allocation, a port of the job's, the SLURM job id.
export RDZV_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export RDZV_PORT="${{RDZV_PORT:-{DEFAULT_PORT}}}"
export RDZV_ID="peft-studio-$SLURM_JOB_ID"
# One task per node; each runs launch.sh, which starts that node's {m.gpus_per_node} process(es)
# (NODE_RANK is SLURM_NODEID there).
srun --nodes={m.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 "$JOB_DIR/launch.sh"
"""


def readme(m: Manifest, on_hub: bool) -> str:
    where = ("a hub id: the cluster downloads it (or set HF_HOME to a shared cache)" if on_hub else
             "a path on the machine that exported the job: copy the model to the cluster")
    note = ""
    if m.source_model == "default":
        note = ("The studio's embedded model is a 4-bit (Q4_1) GGUF copy of this model; the job trains "
                "on the hub's original weights.\n")
    return f"""PEFT Studio job {m.job_id}: run {m.run_id} ({_line(m.run_name)}), {m.nodes} node(s) x {m.gpus_per_node} GPU(s), {m.distributed}.
1. On the cluster, install the same PEFT Studio (pip install peft-studio, or its checkout), and copy this folder to a shared file system.
2. Run it: `sbatch job.sbatch` from this folder under SLURM, or `./launch.sh --rdzv-host FIRST_NODE --node-rank K` on node K = 0, 1, ... (`./launch.sh` alone on one machine).
3. Bring it home: copy the folder back and run `peft-studio job import FOLDER` (stopped or killed? `./launch.sh --resume` continues).

Base model: {m.model} ({where}).
To use another copy of it, change MODEL at the top of launch.sh (or set PEFT_STUDIO_MODEL): that is the one place.
{note}Logs: home/projects/{m.project_folder}/runs/{m.run_folder}/worker.log. Stop it and keep a checkpoint:
PEFT_STUDIO_HOME=home peft-studio stop {m.run_id} (or scancel: SIGTERM saves at the end of the step).
"""
