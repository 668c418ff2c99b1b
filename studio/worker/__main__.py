"""``python -m studio.worker RUN_ID [--resume]``.

The signal handlers go in before the heavy imports (torch, transformers: seconds), so that a
SIGTERM in that window is remembered and ends the run as cancelled instead of killing the
process with the run left "running" (see ``signals.py``)."""

from studio.worker.signals import GracefulStop

stop = GracefulStop()
stop.install()

from studio.worker.train import main  # noqa: E402  (after the handlers, on purpose)

raise SystemExit(main(stop=stop))
