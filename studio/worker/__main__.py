"""``python -m studio.worker RUN_ID [--resume]``.

The signal handlers go in before the heavy imports (torch, transformers: seconds), so that a
SIGTERM in that window is remembered and ends the run as cancelled instead of killing the
process with the run left "running" (see ``signals.py``). Known-harmless library warnings are
filtered from the start (``log_filter.py``)."""

from studio.worker import log_filter
from studio.worker.signals import GracefulStop

log_filter.install()  # before the imports that warn (bitsandbytes' optional CPU kernel)

stop = GracefulStop()
stop.install()

from studio.worker.train import main  # noqa: E402  (after the handlers, on purpose)

raise SystemExit(main(stop=stop))
