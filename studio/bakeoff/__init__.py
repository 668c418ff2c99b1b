"""Method bake-off (issue 8): the same data and budget for several methods, one table.

``core`` sets a bake-off up (one run per method, queued through the worker), ``table`` turns the
runs' metrics into the table (saved with the project, exported as CSV / Markdown, plotted),
``measure`` makes the post-training measurements inside the worker process, ``cli`` is
``peft-studio bakeoff``. The worker runs the queue: each finished run starts the next, so a
bake-off completes with the UI closed.

Only ``measure`` imports torch; the UI imports the rest.
"""

from studio.bakeoff.core import (DEFAULT_METHODS, Budget, cancel_bakeoff, is_finished,
                                 method_spec, progress, start_bakeoff)
from studio.bakeoff.table import (COLUMNS, MEASURED, build_rows, refresh, scatter_points, to_csv,
                                  to_markdown)

__all__ = ["COLUMNS", "DEFAULT_METHODS", "MEASURED", "Budget", "build_rows",
           "cancel_bakeoff", "is_finished", "method_spec", "progress", "refresh", "scatter_points",
           "start_bakeoff", "to_csv", "to_markdown"]
