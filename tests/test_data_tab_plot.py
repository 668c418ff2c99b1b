"""The Data tab's token-length histogram is measured from 0 (issue 15 item 6). Gradio 6's bar
plot sets ``zero: false`` on its y scale, so without explicit limits the axis started at the
smallest count (bars of 20 and 40 looked like 0 and 20), and two equal rows (one bin of 2) gave
the domain [2, 2]: no bar at all, and an axis labelled "2.000000"."""

from __future__ import annotations

import pandas as pd

from studio.ui.data_tab import empty_histogram, histogram_update


def test_bars_start_at_zero_and_a_single_bin_is_drawn():
    counts = pd.DataFrame({"tokens": ["60–70", "70–80"], "rows": [20.0, 40.0]})
    assert histogram_update(counts)["y_lim"] == [0.0, 44.0]
    equal_rows = pd.DataFrame({"tokens": ["74–74"], "rows": [2.0]})
    low, high = histogram_update(equal_rows)["y_lim"]
    assert low == 0.0 and high > 2.0
    assert histogram_update(empty_histogram())["y_lim"] == [0.0, 1.0]


def test_counts_in_validation_messages_agree_with_their_nouns():
    from studio.data.validate import counted

    assert (counted(1, "invalid row"), counted(1, "problem")) == ("1 invalid row", "1 problem")
    assert counted(1234, "invalid row") == "1,234 invalid rows"
