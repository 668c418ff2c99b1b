"""``python -m studio`` is ``peft-studio``."""

from studio.cli import main

raise SystemExit(main())
