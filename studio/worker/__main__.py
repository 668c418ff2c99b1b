"""``python -m studio.worker RUN_ID [--resume]``."""

from studio.worker.train import main

raise SystemExit(main())
