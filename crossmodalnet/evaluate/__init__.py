"""The evaluator: Dice, IoU and HD95 per structure and case, as a CSV, a JSON summary and plots.

Inputs are label maps (X, Y, Z) of class indices 0..K-1 (files may hold the dataset's label values),
scored per class and per region of the dataset (`data.spec.DataSpec`). Modules:
`metrics` (one case, HD95 conventions, empty-mask rules), `topology` (Betti numbers and their
errors), `summary` (many cases in memory, the summary and its table), `plots` (PNG figures) and
`paths` (files: matching, reading, writing the report). See docs/design.md, "Evaluation and HD95
conventions".
"""

from crossmodalnet.evaluate.metrics import COLUMNS, HD95_CONVENTIONS, TOPOLOGY_COLUMNS, compute_case_metrics
from crossmodalnet.evaluate.paths import evaluate_paths, match_cases, resolve_spec
from crossmodalnet.evaluate.summary import evaluate_arrays, format_table, summarize

__all__ = [
    "HD95_CONVENTIONS",
    "COLUMNS",
    "TOPOLOGY_COLUMNS",
    "compute_case_metrics",
    "evaluate_arrays",
    "evaluate_paths",
    "match_cases",
    "resolve_spec",
    "summarize",
    "format_table",
]
