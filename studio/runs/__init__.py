"""The run supervisor, inside the UI and CLI processes: create, start, stop, resume, reconcile
and queue runs (``launch``). The training child itself is ``studio.worker``; the two talk only
through the database and the run folder.
"""
