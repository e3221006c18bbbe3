"""Plain-text rendering for the command line: aligned tables, sizes and ages.

The functions live in ``keisei_fn.display``, shared with the notebook representations of the
library's values, so that the command line and a notebook render alike.
"""

from __future__ import annotations

from keisei_fn.display import human_age, human_bytes, render_table

__all__ = ["human_age", "human_bytes", "render_table"]
