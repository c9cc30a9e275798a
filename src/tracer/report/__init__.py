"""Reports from run directories: rich tables, markdown, JSON, plots and wrong-answer examples.

Pure Python + rich (no MLX, no numpy); matplotlib is imported only when a plot is drawn.

- :mod:`.load`: run directories read (metadata, metrics, config, episodes, GRPO step log);
- :mod:`.rows`: their metrics as rows of plain data, compared, paired and as JSON;
- :mod:`.cells`: the text of each cell;
- :mod:`.tables`: rich tables for the terminal; :mod:`.markdown`: the same as markdown;
- :mod:`.plot`: PNG plots; :mod:`.examples`: wrong answers with their hops checked.

Names below are the package's public interface.
"""

from tracer.report.examples import examples_renderables, wrong_examples
from tracer.report.load import grpo_log, load_run, load_runs, read_episodes
from tracer.report.markdown import to_markdown
from tracer.report.plot import PLOT_HINT, plot
from tracer.report.rows import (ROW_KEYS, comparison_rows, config_diff, hop_recall_rows, latest_done, paired_rows,
                                per_hop_rows, phase_rows, to_json)
from tracer.report.tables import (comparison_table, config_diff_table, hop_recall_table, per_hop_table,
                                  report_renderables, run_table)

__all__ = [
    "PLOT_HINT", "ROW_KEYS", "comparison_rows", "comparison_table", "config_diff", "config_diff_table",
    "examples_renderables", "grpo_log", "hop_recall_rows", "hop_recall_table", "latest_done", "load_run",
    "load_runs", "paired_rows", "per_hop_rows", "per_hop_table", "phase_rows", "plot", "read_episodes",
    "report_renderables", "run_table", "to_json", "to_markdown", "wrong_examples",
]
