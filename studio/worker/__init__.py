"""The training worker: one process per run, started by ``studio.runs.launch``, never importing gradio.

``python -m studio.worker RUN_ID [--resume]`` trains the run described by the run's RunSpec and
reports through the database (status, heartbeat, metrics, checkpoints), which is the message bus
between the worker and the UI.
"""
