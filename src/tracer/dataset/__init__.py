"""Questions from a knowledge graph, and the files they live in (pure Python, standard library only).

A question names a start entity and a relation chain. On a many-to-many graph the chain may reach
several entities; exactly one of the four options is among them (the answer), and the three
distractors are near misses the chain does not reach (``kg.follow``). The reference trace is the
chain's lexicographically smallest simple path to the answer (:func:`paths.canonical_path`). On a
graph where every (entity, relation) has one target that path is the only one.

The package, in the order a split is made:

- :mod:`.paths`: question paths of a KG, listed or sampled, and their keys;
- :mod:`.templates`: the question texts;
- :mod:`.questions`: one row from a path (distractors, facts, prompt, reference trace);
- :mod:`.counterfactual`: renamed copies whose facts contradict the KG;
- :mod:`.splits`: train / rsft / eval (/ eval_shuffled), byte-identical for a seed and KG;
- :mod:`.verify`: the rules the splits keep, checked and summarised;
- :mod:`.jsonl`: JSONL files written and read, example rows validated.

The prompt and the completion format are :mod:`tracer.format`'s. Names below are the package's
public interface.
"""

from tracer.dataset.jsonl import SPLIT_FILES, load_examples, normalize_row, read_jsonl, write_jsonl, write_splits
from tracer.dataset.paths import asked, enumerate_paths, passes_through, path_key
from tracer.dataset.splits import generate_splits, question_counts
from tracer.dataset.verify import summarize, train_edge_coverage, verify_row, verify_splits

__all__ = [
    "SPLIT_FILES", "asked", "enumerate_paths", "generate_splits", "load_examples", "normalize_row", "passes_through",
    "path_key", "question_counts", "read_jsonl", "summarize", "train_edge_coverage", "verify_row",
    "verify_splits", "write_jsonl", "write_splits",
]
