"""The train / rsft / eval (/ eval_shuffled) splits of a KG's questions (pure Python).

Every random choice comes from one ``random.Random(cfg.seed)`` consumed in a fixed order (the
held-out paths, the training paths and their templates, then the rows in split order), and every
set is sorted before anything is chosen from it, so the same seed and KG give byte-identical
splits. The eval and RSFT questions are distinct paths with their hop lengths mixed evenly; the
training split takes ``train_per_hop`` multi-hop questions on other paths, then one-hop questions
until every edge appears ``min_edge_coverage`` times. Renamed copies draw from their own generators.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from tracer.dataset.counterfactual import counterfactual_rows
from tracer.dataset.paths import (
    Path_, Progress, asked, enumerate_paths, passes_through, path_key, question_key, sample_paths, unique_edges,
)
from tracer.dataset.questions import QuestionContext, make_row
from tracer.dataset.templates import templates_for
from tracer.dataset.verify import verify_splits
from tracer.errors import TracerError
from tracer.format import LETTERS, build_prompt, with_answer

if TYPE_CHECKING:  # pragma: no cover
    from tracer.config import DataConfig
    from tracer.kg import KG

Key = tuple[str, tuple[str, ...], str]  # a question key: (start, relation chain, answer)


def _letter_stream(rng: random.Random) -> Iterator[str]:
    """Gold letters in shuffled ABCD blocks: every letter within one of n/4 at any prefix."""
    while True:
        block = list(LETTERS)
        rng.shuffle(block)
        yield from block


def _shuffle_row(row: dict[str, Any], rng: random.Random, counts: Counter) -> dict[str, Any]:
    """Permute the options of an eval row so the gold letter changes (balanced over the split)."""
    old = row["answer_star"]
    gold = row["options"][old]
    choices = [L for L in LETTERS if L != old]
    low = min(counts[L] for L in choices)
    new = rng.choice([L for L in choices if counts[L] == low])
    counts[new] += 1
    distractors = [row["options"][L] for L in LETTERS if L != old]
    rng.shuffle(distractors)
    it = iter(distractors)
    options = {L: (gold if L == new else next(it)) for L in LETTERS}
    meta = dict(row["meta"])
    meta["shuffled_from"] = row["id"]
    ps = row["path_star"]
    return {
        "id": row["id"] + "-shuf",
        "split": "eval_shuffled",
        "hop_len": row["hop_len"],
        "question": row["question"],
        "options": options,
        "answer_star": new,
        "path_star": {"entities": list(ps["entities"]), "edges": [dict(e) for e in ps["edges"]]},
        "prompt": build_prompt(row["question"], options, meta.get("facts"), meta.get("option_tags", False)),
        "ref": {"trace": with_answer(row["ref"]["trace"], new)},
        "meta": meta,
    }


def _even_quota(total: int, hops: list[int], avail: dict[int, int]) -> dict[int, int]:
    """Split ``total`` over ``hops`` as evenly as the available counts allow."""
    quota = {h: 0 for h in hops}
    left = total
    open_hops = [h for h in hops if avail[h] > 0]
    while left > 0 and open_hops:
        share, extra = divmod(left, len(open_hops))
        progressed = False
        for i, h in enumerate(open_hops):
            want = share + (1 if i < extra else 0)
            take = min(want, avail[h] - quota[h])
            if take > 0:
                quota[h] += take
                left -= take
                progressed = True
        open_hops = [h for h in open_hops if quota[h] < avail[h]]
        if not progressed:
            break
    return quota


def question_pools(kg: "KG", cfg: "DataConfig", hops: list[int], ctx: QuestionContext | None = None,
                   progress: Progress | None = None) -> tuple[dict[int, list[Path_]], bool]:
    """Answerable question paths per hop length, and whether they were sampled (the graph too
    dense to list every path: :func:`sample_paths` draws about twice what ``cfg`` needs)."""
    ctx = ctx or QuestionContext(kg, cfg, random.Random(cfg.seed))
    pools = enumerate_paths(kg, hops)
    sampled = pools is None
    if sampled:
        per_eval_hop = -(-(cfg.eval_size + cfg.rsft_size) // max(1, len(cfg.eval_hops)))
        want = {h: 2 * max(per_eval_hop if h in cfg.eval_hops else 0, int(cfg.train_per_hop.get(str(h), 0))) + 100
                for h in hops}
        pools = sample_paths(kg, want, random.Random(f"{cfg.seed}:paths"), progress)
    return {h: [p for p in ps if ctx.answerable(p)] for h, ps in pools.items()}, sampled


def question_counts(kg: "KG", cfg: "DataConfig", hops: Iterable[int] = range(1, 6)) -> dict[str, Any]:
    """Distinct answerable questions (start, chain, answer) per hop length, what ``cfg`` needs of
    each, and whether the counts are a sample's (a lower bound: the graph is too dense to list)."""
    hops = sorted(set(hops))
    pools, sampled = question_pools(kg, cfg, hops)
    need = {h: int(cfg.train_per_hop.get(str(h), 0)) for h in hops}
    for h in hops:
        if h in cfg.eval_hops:
            need[h] += -(-(cfg.eval_size + cfg.rsft_size) // len(cfg.eval_hops))
    if 1 in cfg.train_hops and 1 in need:
        need[1] = max(need[1], len(unique_edges(kg)))
    return {"hops": {h: len(pools[h]) for h in hops}, "need": need, "sampled": sampled}


def generate_splits(
    kg: "KG", cfg: "DataConfig", exclude: frozenset[Key] = frozenset(), progress: Progress | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Build the train / rsft / eval (/ eval_shuffled) splits; every rule is verified.

    ``exclude`` holds :func:`path_key` keys that no question of any split may take, nor ask what
    they ask, nor pass through it where it has an eval hop length (:func:`passes_through`: a held-out
    question; a shorter one, from a training file, may be built on); ``progress(stage, done,
    total)`` is called as rows are built.
    """
    rng = random.Random(cfg.seed)
    ctx = QuestionContext(kg, cfg, rng)
    train_hops = sorted(set(cfg.train_hops))
    eval_hops = sorted(set(cfg.eval_hops))
    _check_settings(kg, cfg, train_hops + eval_hops)
    multi = sorted({h for h in train_hops if h > 1} | set(eval_hops))
    pools, _ = question_pools(kg, cfg, multi, ctx, progress)
    if exclude:
        out = {asked(k) for k in exclude}  # an excluded key's question, so the key itself too
        held_out = {q for q in out if len(q[1]) >= min(eval_hops)}
        pools = {h: [p for p in ps if asked(question_key(p)) not in out
                     and not passes_through(question_key(p), held_out)] for h, ps in pools.items()}
    eval_paths, rsft_paths = _held_out_paths(pools, cfg, eval_hops, rng)
    held = {question_key(p) for p in eval_paths} | {question_key(p) for p in rsft_paths} | exclude
    eval_asked = {asked(question_key(p)) for p in eval_paths}
    items = _multi_hop_items(pools, cfg, train_hops, held, eval_asked, rng)
    if 1 in train_hops:
        items += _one_hop_items(kg, cfg, items, held, rng)
    rng.shuffle(items)
    splits: dict[str, list[dict[str, Any]]] = {
        "train": _build_rows(ctx, items, "train", progress),
        "rsft": _build_rows(ctx, _with_templates(rsft_paths, rng), "rsft", progress),
        "eval": _build_rows(ctx, _with_templates(eval_paths, rng), "eval", progress),
    }
    if cfg.shuffled_eval:
        counts: Counter = Counter()
        splits["eval_shuffled"] = [_shuffle_row(r, rng, counts) for r in splits["eval"]]
    splits["rsft"] = _pool_apart_from_eval(kg, cfg, pools, splits, eval_asked)
    verify_splits(kg, splits, cfg)
    _add_counterfactuals(kg, cfg, splits, exclude)
    return splits


def _pool_apart_from_eval(kg: "KG", cfg: "DataConfig", pools: dict[int, list[Path_]],
                          splits: dict[str, list[dict[str, Any]]],
                          taken: set[tuple[str, tuple[str, ...]]]) -> list[dict[str, Any]]:
    """The RSFT pool's rows, none asking or passing through an eval question
    (:func:`passes_through`). On a many-to-many graph two paths may share a start and relation chain
    and end apart; training on one would teach the other's reasoning. On any graph, a longer chain
    that starts with an eval question's runs through its answer. Each such pool row is replaced by
    a row on an unused path of its hop length, with the same id and answer letter, drawn by a
    generator of its own, so every other row stays as it is; a row with no path left to take is
    dropped. ``taken``: what the eval questions ask."""
    rows = splits["rsft"]
    clash = [i for i, r in enumerate(rows) if passes_through(path_key(r), taken)]
    if not clash:
        return rows
    rng = random.Random(f"{cfg.seed}:pool-apart-from-eval")
    ctx = QuestionContext(kg, cfg, rng)
    used = {path_key(r) for rs in splits.values() for r in rs}
    spare: dict[int, list[Path_]] = {}
    for h in sorted({rows[i]["hop_len"] for i in clash}):
        spare[h] = [p for p in pools.get(h, [])
                    if question_key(p) not in used and not passes_through(question_key(p), taken)]
        rng.shuffle(spare[h])
    out: list[dict[str, Any] | None] = list(rows)
    for i in clash:
        row, left = rows[i], spare[rows[i]["hop_len"]]
        out[i] = None
        if left:
            p = left.pop()
            out[i] = make_row(ctx, p, row["answer_star"], rng.randrange(len(templates_for(p[1]))), "rsft")
            out[i]["id"] = row["id"]
    return [r for r in out if r is not None]


def _check_settings(kg: "KG", cfg: "DataConfig", hops: list[int]) -> None:
    """Refuse a KG too small for four options, and facts too few for the longest path's edges."""
    if len(kg.entities) < 4:
        raise TracerError(f"KG has {len(kg.entities)} entities; 4 options need at least 4")
    if cfg.context == "facts":
        longest = max(hops)
        if cfg.max_facts < longest:
            raise TracerError(
                f"data.max_facts={cfg.max_facts} cannot hold the {longest} gold edges of a {longest}-hop path"
            )


def _held_out_paths(pools: dict[int, list[Path_]], cfg: "DataConfig", eval_hops: list[int],
                    rng: random.Random) -> tuple[list[Path_], list[Path_]]:
    """The eval and RSFT-pool paths: distinct keys, hop lengths mixed evenly, each list shuffled."""
    shuffled = {h: list(pools[h]) for h in eval_hops}
    for h in eval_hops:
        rng.shuffle(shuffled[h])
    avail = {h: len(shuffled[h]) for h in eval_hops}
    q_eval = _even_quota(cfg.eval_size, eval_hops, avail)
    if sum(q_eval.values()) < cfg.eval_size:
        have = ", ".join(f"{avail[h]} {h}-hop" for h in eval_hops)
        raise TracerError(
            f"KG has only {have} answerable paths; data.eval_size={cfg.eval_size} needs more "
            f"(add edges, lower eval_size, or change eval_hops; `tracer kg stats` counts them)"
        )
    eval_paths: list[Path_] = []
    for h in eval_hops:
        eval_paths.extend(shuffled[h][: q_eval[h]])
        shuffled[h] = shuffled[h][q_eval[h]:]
    avail = {h: len(shuffled[h]) for h in eval_hops}
    q_rsft = _even_quota(cfg.rsft_size, eval_hops, avail)
    rsft_paths: list[Path_] = []
    for h in eval_hops:
        rsft_paths.extend(shuffled[h][: q_rsft[h]])
    if cfg.rsft_size > 0 and not rsft_paths:
        raise TracerError(
            f"no {'/'.join(map(str, eval_hops))}-hop paths left for the RSFT pool after "
            f"{cfg.eval_size} eval questions (lower data.eval_size or set data.rsft_size=0)"
        )
    rng.shuffle(eval_paths)
    rng.shuffle(rsft_paths)
    return eval_paths, rsft_paths


def _multi_hop_items(pools: dict[int, list[Path_]], cfg: "DataConfig", train_hops: list[int], held: set[Key],
                     eval_asked: set[tuple[str, tuple[str, ...]]], rng: random.Random) -> list[tuple[Path_, int]]:
    """``train_per_hop`` (path, template) items per multi-hop length, on paths not ``held`` and not
    asking or passing through an eval question (``eval_asked``, when train and eval share a hop
    length): the pool shuffled and repeated as often as needed, each repeat of a path in its next
    template."""
    items: list[tuple[Path_, int]] = []
    for h in train_hops:
        if h == 1:
            continue
        n = int(cfg.train_per_hop.get(str(h), 0))
        if n <= 0:
            continue
        pool = [p for p in pools[h] if question_key(p) not in held and not passes_through(question_key(p), eval_asked)]
        if not pool:
            raise TracerError(f"KG has no answerable {h}-hop paths left for training (train_per_hop['{h}']={n})")
        order: list[Path_] = []
        while len(order) < n:
            batch = list(pool)
            rng.shuffle(batch)
            order.extend(batch)
        uses: Counter = Counter()
        for p in order[:n]:
            k = question_key(p)
            n_t = len(templates_for(p[1]))
            items.append((p, (uses[k] + rng.randrange(n_t)) % n_t))
            uses[k] += 1
    return items


def _one_hop_items(kg: "KG", cfg: "DataConfig", multi: list[tuple[Path_, int]], held: set[Key],
                   rng: random.Random) -> list[tuple[Path_, int]]:
    """One-hop items until every KG edge (not a held path) appears ``min_edge_coverage`` times in
    the training paths, the ``multi``-hop items' edges counted; at least once each."""
    coverage: Counter = Counter()
    for (ents, rels), _ in multi:
        for i in range(len(rels)):
            coverage[(ents[i], rels[i], ents[i + 1])] += 1
    items: list[tuple[Path_, int]] = []
    for s, r, d in unique_edges(kg):
        if s == d:
            continue
        p: Path_ = ((s, d), (r,))
        if question_key(p) in held:
            continue
        need = max(1, cfg.min_edge_coverage - coverage[(s, r, d)])
        n_t = len(templates_for((r,)))
        base = rng.randrange(n_t)
        for k in range(need):
            items.append((p, (base + k) % n_t))
        coverage[(s, r, d)] += need
    return items


def _with_templates(paths: list[Path_], rng: random.Random) -> list[tuple[Path_, int]]:
    return [(p, rng.randrange(len(templates_for(p[1])))) for p in paths]


def _build_rows(ctx: QuestionContext, items: list[tuple[Path_, int]], split: str,
                progress: Progress | None) -> list[dict[str, Any]]:
    """The split's rows, numbered, their gold letters balanced (:func:`_letter_stream`)."""
    letters = _letter_stream(ctx.rng)
    rows = []
    for i, (p, t) in enumerate(items, 1):
        if progress and i % 500 == 1:
            progress(f"{split} questions", i - 1, len(items))
        row = make_row(ctx, p, next(letters), t, split)
        row["id"] = f"{split}-{i:05d}"
        rows.append(row)
    return rows


def _add_counterfactuals(kg: "KG", cfg: "DataConfig", splits: dict[str, list[dict[str, Any]]],
                         exclude: frozenset[Key]) -> None:
    """Renamed copies into train and the RSFT pool, as ``cfg`` asks; they draw from their own
    generators, so without them the splits stay as they are."""
    held_keys = {path_key(r) for r in splits["eval"] + splits["rsft"]} | exclude
    if cfg.counterfactual > 0:
        splits["train"] += counterfactual_rows(kg, splits["train"], cfg.counterfactual,
                                               random.Random(f"{cfg.seed}:counterfactual"), held_keys,
                                               cfg.counterfactual_from)
    if cfg.counterfactual_pool > 0:
        # each copy right after its original, so rsft.max_questions takes both kinds in proportion
        copies = {r["meta"]["renamed_from"]: r for r in counterfactual_rows(
            kg, splits["rsft"], cfg.counterfactual_pool, random.Random(f"{cfg.seed}:counterfactual-pool"), held_keys,
            cfg.counterfactual_from)}
        splits["rsft"] = [x for r in splits["rsft"] for x in (r, copies.get(r["id"])) if x is not None]
