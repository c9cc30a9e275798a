"""The service layer: every CLI command is one function here that does the work and returns data.

Heavy modules (MLX, the model, training) are imported inside the functions that need them, so
``tracer data`` and ``tracer report`` start fast and never touch MLX.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from tracer import dataset, runs
from tracer.config import Config, DataConfig, load_config, to_toml
from tracer.errors import TracerError
from tracer.kg import KG, load_kg
from tracer.progress import NullProgress, Progress

SPLIT_FILES = {"train": "train.jsonl", "rsft": "rsft.jsonl", "eval": "eval.jsonl", "eval_shuffled": "eval_shuffled.jsonl"}
SETTINGS_FILE = "splits.json"


# ---------------------------------------------------------------------------------------- data


def split_path(cfg: Config, split: str) -> Path:
    return Path(cfg.data.out_dir) / SPLIT_FILES[split]


def data_settings(cfg: Config) -> dict:
    """What the splits are a function of: the KG's content and every [data] knob that shapes them."""
    kg = Path(cfg.data.kg)
    digest = None
    if kg.is_file():
        raw = kg.read_bytes()
        try:  # the content, not its formatting
            raw = json.dumps(json.loads(raw), sort_keys=True).encode()
        except ValueError:
            pass
        digest = hashlib.sha256(raw).hexdigest()
    return {"kg_sha256": digest, **cfg.data.model_dump(exclude={"kg", "out_dir", "shuffled_eval"})}


def excluded_keys(cfg: Config) -> frozenset:
    """Path keys of the questions in ``data.exclude``'s files: no generated question may take them."""
    return frozenset(dataset.path_key(r) for f in cfg.data.exclude for r in dataset.load_examples(f))


def make_data(cfg: Config) -> dict:
    """Generate the question splits from the KG and write them; returns paths and the summary.

    ``splits.json`` beside them records :func:`data_settings`, so later commands can tell
    whether the files still match their config.
    """
    kg = load_kg(cfg.data.kg)
    splits = dataset.generate_splits(kg, cfg.data, excluded_keys(cfg))
    paths = dataset.write_splits(splits, cfg.data.out_dir)
    runs.write_json(Path(cfg.data.out_dir) / SETTINGS_FILE, data_settings(cfg))
    return {"paths": {k: str(v) for k, v in paths.items()}, "summary": dataset.summarize(splits, kg, cfg.data)}


def ensure_data(cfg: Config) -> dict | None:
    """Generate the splits if any of them is missing; returns the summary when it generated.

    Splits made under other [data] settings (or another KG) are refused, not silently reused.
    Splits without ``splits.json`` (written before it existed) are taken as they are.
    """
    needed = ["train", "rsft", "eval"] + (["eval_shuffled"] if cfg.data.shuffled_eval else [])
    if not all(split_path(cfg, s).exists() for s in needed):
        return make_data(cfg)
    stored_file = Path(cfg.data.out_dir) / SETTINGS_FILE
    if stored_file.is_file():
        stored, now = runs.read_json(stored_file), data_settings(cfg)
        if not isinstance(stored, dict):
            raise TracerError(f"{stored_file}: expected a JSON object; remake the splits with `tracer data -c CONFIG`")
        default = DataConfig().model_dump()  # a knob newer than the record: its default was in force
        changed = [k for k in now if stored.get(k, default.get(k)) != now[k]]
        if changed:
            what = ", ".join("the KG" if k == "kg_sha256" else f"data.{k}" for k in changed)
            raise TracerError(f"{cfg.data.out_dir}: the splits there were made under other settings ({what} differ); "
                              "remake them with `tracer data -c CONFIG` or set data.out_dir to a new directory")
    return None


def load_split(cfg: Config, split: str, path: str | None = None, kg: KG | None = None) -> list[dict]:
    return dataset.load_examples(path or split_path(cfg, split), kg=kg, context=cfg.data.context)


# ------------------------------------------------------------------------------ leakage guard


def eval_overlap(train_rows: list[dict], eval_rows: list[dict]) -> list[str]:
    """Ids of training rows whose id or path (start, relation chain, answer) is in the eval split.

    A row that names no relations is matched by its entity chain instead.
    """
    eval_ids = {r["id"] for r in eval_rows}
    eval_keys = {dataset.path_key(r) for r in eval_rows}
    eval_chains = {tuple(r["path_star"]["entities"]) for r in eval_rows}

    def leaks(r: dict) -> bool:
        key = dataset.path_key(r)
        return r["id"] in eval_ids or key in eval_keys or (not key[1] and tuple(r["path_star"]["entities"]) in eval_chains)

    return [r["id"] for r in train_rows if leaks(r)]


def guard_leakage(cfg: Config, rows: list[dict], source: str, allow: bool, kg: KG | None = None) -> bool:
    """Refuse training rows that overlap the eval split; returns True when the run is contaminated.

    With no eval split on disk yet, the one the config would make (and a later ``tracer eval``
    would evaluate on) is generated in memory to compare against; where the config can make none,
    there is nothing to leak into.
    """
    eval_file, where = split_path(cfg, "eval"), ""
    if eval_file.exists():
        eval_rows = load_split(cfg, "eval", kg=kg)
    else:
        exclude = excluded_keys(cfg)
        try:
            eval_rows, where = dataset.generate_splits(kg or load_kg(cfg.data.kg), cfg.data, exclude)["eval"], " (not made yet)"
        except TracerError:
            return False
    overlap = eval_overlap(rows, eval_rows)
    if not overlap:
        return False
    if not allow:
        raise TracerError(
            f"{source}: {len(overlap)} training examples overlap the eval split {eval_file}{where} "
            f"(first: {overlap[0]}); refusing to train on eval questions (--allow-eval-overlap overrides)"
        )
    return True


# ------------------------------------------------------------------------------------ models


def model_spec(cfg: Config, model: str | None = None) -> str:
    return model or cfg.model.path


def _load_args(cfg: Config, model: str | None, adapter: str | None) -> dict:
    """:func:`tracer.model.load` arguments for generation: the adapter merged into the weights."""
    return {"spec": model_spec(cfg, model), "cache_dir": cfg.model.cache_dir, "adapter": adapter,
            "dtype": cfg.model.dtype, "fuse": True}


def load_model(cfg: Config, model: str | None = None, adapter: str | None = None):
    """The base model; an ``adapter`` is merged into its weights (generation only needs that)."""
    from tracer import model as models

    return models.load(**_load_args(cfg, model, adapter))


def generation_pool(cfg: Config, model: str | None = None, adapter: str | None = None):
    """A :class:`tracer.workers.Pool` of ``eval.workers`` processes for this model + adapter."""
    from tracer import workers

    return workers.Pool(_load_args(cfg, model, adapter), workers.auto_workers(cfg.eval.workers))


def base_model_id(cfg: Config, model: str | None = None) -> str:
    from tracer import model as models

    return models.model_id(model_spec(cfg, model))


# -------------------------------------------------------------------------------------- eval


def _score_rows(rows: list[dict], completions: list[str], kg: KG, cfg: Config, phase: str) -> list[dict]:
    from tracer import reward

    matcher = reward.EntityMatcher(kg.entities)
    return [
        reward.episode(row, text, phase, reward.score(text, row, matcher, kg, cfg.reward))
        for row, text in zip(rows, completions)
    ]


def evaluate(
    cfg: Config,
    *,
    examples: str | None = None,
    model: str | None = None,
    adapter: str | None = None,
    phase: str = "eval",
    output: str | Path | None = None,
    shuffled: bool | None = None,
    progress: Progress | None = None,
    contaminated: bool = False,
) -> dict:
    """Generate answers for the eval questions, score them with the KG and record the phase."""
    from tracer import metrics

    progress = progress or NullProgress()
    contaminated = contaminated or adapter_contaminated(adapter)
    kg = load_kg(cfg.data.kg)
    if examples is None:
        ensure_data(cfg)
    rows = load_split(cfg, "eval", examples, kg=kg)
    if cfg.eval.max_examples:
        rows = rows[: cfg.eval.max_examples]
    run_dir = Path(output) if output else Path(cfg.run.runs_dir) / cfg.run.name
    pool = generation_pool(cfg, model, adapter)

    def answer(batch: list[dict]) -> list[str]:
        progress.start("generate", total=len(batch))
        texts = pool.generate([r["prompt"] for r in batch], progress=_OneBar(progress), max_tokens=cfg.eval.max_tokens,
                              batch_size=cfg.eval.batch_size, seed=cfg.eval.seed)
        progress.stop()
        return texts

    t0 = time.perf_counter()
    with pool:
        episodes = _score_rows(rows, answer(rows), kg, cfg, phase)
        entry = metrics.aggregate(episodes)
        entry["shuffle_agreement"] = None
        if cfg.eval.shuffled if shuffled is None else shuffled:
            shuf_path = Path(examples).with_name("eval_shuffled.jsonl") if examples else split_path(cfg, "eval_shuffled")
            wanted = {r["id"] + "-shuf" for r in rows}
            shuf_rows = [r for r in load_split(cfg, "eval_shuffled", str(shuf_path), kg=kg) if r["id"] in wanted]
            shuf_eps = _score_rows(shuf_rows, answer(shuf_rows), kg, cfg, phase + "_shuffled")
            entry["shuffle_agreement"] = metrics.shuffle_agreement(episodes, shuf_eps, rows, shuf_rows)
    entry["wall_s"] = round(time.perf_counter() - t0, 2)  # model loading included
    entry["workers"] = pool.used
    entry["finished_at"] = runs.now()
    entry["model"] = model_spec(cfg, model)
    entry["adapter"] = adapter
    entry["examples"] = str(examples or split_path(cfg, "eval"))

    if not (run_dir / "meta.json").exists():
        runs.init_run(run_dir, to_toml(cfg), [phase], cfg.run.seed)
    dataset.write_jsonl(runs.episodes_path(run_dir, phase), episodes)
    runs.record_phase(run_dir, phase, entry, contaminated=contaminated)
    return {"phase": phase, "entry": entry, "run_dir": str(run_dir), "episodes": str(runs.episodes_path(run_dir, phase))}


# ----------------------------------------------------------------------------------- training


def _pairs(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["prompt"], r["ref"]["trace"]) for r in rows]


def _split_val(rows: list[dict], size: int, seed: int) -> tuple[list[dict], list[dict]]:
    if size <= 0 or len(rows) <= 2 * size:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val = set(order[:size])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def _train(cfg: Config, tcfg, rows: list[dict], out_dir: Path, model: str | None, resume: bool,
           progress: Progress, init_adapter: str | None = None) -> dict:
    from tracer import train

    untraced = next((r["id"] for r in rows if not isinstance(r["ref"].get("trace"), str)), None)
    if untraced is not None:
        raise TracerError(f"example {untraced}: no reference trace to train on "
                          "(give ref.trace, or path_star.edges or meta.relations to build one)")
    lm, tokenizer = load_model(cfg, model)
    train_rows, val_rows = _split_val(rows, tcfg.val_size if tcfg.val_every else 0, tcfg.seed)
    stats = train.train(
        lm, tokenizer, _pairs(train_rows), tcfg, cfg.lora, out_dir,
        base_model=base_model_id(cfg, model), val_pairs=_pairs(val_rows) or None,
        hop_lens=[r["hop_len"] for r in train_rows], resume=resume, progress=progress,
        init_adapter=init_adapter,
    )
    stats["adapter"] = str(out_dir)
    return stats


def sft(
    cfg: Config,
    *,
    train: str | None = None,
    model: str | None = None,
    output: str | Path | None = None,
    resume: bool = False,
    allow_eval_overlap: bool = False,
    progress: Progress | None = None,
) -> dict:
    """LoRA SFT on reference traces; returns training stats and the adapter directory."""
    kg = load_kg(cfg.data.kg)
    if train is None:
        ensure_data(cfg)
    source = train or str(split_path(cfg, "train"))
    rows = load_split(cfg, "train", source, kg=kg)
    contaminated = guard_leakage(cfg, rows, source, allow_eval_overlap, kg)
    out_dir = Path(output) if output else runs.model_dir(Path(cfg.run.runs_dir) / cfg.run.name, "sft")
    stats = _train(cfg, cfg.sft, rows, out_dir, model, resume, progress or NullProgress())
    _mark(out_dir, contaminated)
    stats["contaminated"] = contaminated
    return stats


def adapter_contaminated(adapter: str | Path | None) -> bool:
    """Whether an adapter (or one it was continued from) was trained with eval overlap."""
    cfg_file = Path(adapter) / "adapter_config.json" if adapter else None
    if cfg_file is None or not cfg_file.is_file():
        return False
    return bool(runs.read_json(cfg_file).get("contaminated"))


def _mark(adapter: str | Path, contaminated: bool) -> None:
    if contaminated:
        cfg_file = Path(adapter) / "adapter_config.json"
        runs.write_json(cfg_file, dict(runs.read_json(cfg_file), contaminated=True))


def check_adapter_base(cfg: Config, adapter: str, model: str | None = None) -> dict:
    """Refuse an adapter trained for another base model."""
    from tracer.train import read_adapter_config

    acfg = read_adapter_config(adapter)
    want = base_model_id(cfg, model)
    have = acfg.get("base_model")
    if have and have != want:
        raise TracerError(f"{adapter}: adapter was trained for base model '{have}', not '{want}'")
    return acfg


def continue_(
    cfg: Config,
    *,
    adapter: str,
    train: str,
    output: str | Path,
    model: str | None = None,
    allow_eval_overlap: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Continue training an existing adapter on new examples."""
    check_adapter_base(cfg, adapter, model)
    kg = load_kg(cfg.data.kg)
    rows = load_split(cfg, "train", train, kg=kg)
    contaminated = guard_leakage(cfg, rows, train, allow_eval_overlap, kg) or adapter_contaminated(adapter)
    stats = _train(cfg, cfg.sft, rows, Path(output), model, resume, progress or NullProgress(), init_adapter=adapter)
    _mark(output, contaminated)
    stats["contaminated"] = contaminated
    return stats


def rsft_phase_name(round_index: int) -> str:
    return "rsft" if round_index == 1 else f"rsft_r{round_index}"


def select_winners(scored: list[dict], keep_top: int, min_reward: float, require_correct: bool = True) -> list[dict]:
    """Per question, the best ``keep_top`` distinct samples with reward >= ``min_reward`` (and correct).

    Ties in reward go to the sample whose hops are more often real KG edges (a detour through a
    non-edge names every gold entity too), then to the earlier sample.
    """
    by_question: dict[str, list[dict]] = {}
    for s in scored:
        by_question.setdefault(s["ex_id"], []).append(s)
    winners = []
    for ex_id in sorted(by_question):
        ok = [s for s in by_question[ex_id]
              if (s["correct"] or not require_correct) and s["parsed"]["valid_format"]
              and s["reward"]["total"] >= min_reward]
        ok.sort(key=lambda s: (-s["reward"]["total"], -s["reward"]["edge_precision"], s["sample"]))
        seen: set[str] = set()
        for s in ok:
            if s["completion"] not in seen and len(seen) < keep_top:
                seen.add(s["completion"])
                winners.append(s)
    return winners


def round_questions(pool: list[dict], n: int, r: int, rotate: bool) -> list[dict]:
    """The pool questions round ``r`` (1-based) samples: all of them when ``n`` is 0 or covers the
    pool; else the first ``n``, or with ``rotate`` the ``n`` after those of round r - 1 (wrapping).
    """
    if not n or n >= len(pool):
        return pool
    if not rotate:
        return pool[:n]
    start = (r - 1) * n % len(pool)
    return (pool[start:] + pool[:start])[:n]


def _copy_adapter(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in runs.ADAPTER_FILES:
        shutil.copy2(src / name, dst / name)


def winner_rows(winners: list[dict], by_id: dict[str, dict]) -> list[dict]:
    """Training rows from winning samples: the question's row with the winner as its reference trace.

    A correct winner sampled under another prompt of the same question (closed-book winners reused
    for facts prompts, whose options are drawn anew) gets the row's answer letter.
    """
    from tracer import reward

    rows = []
    for w in winners:
        row = by_id.get(w["ex_id"])
        if row is None:
            raise TracerError(f"sample {w['ex_id']}: question is not in the RSFT pool")
        drawn_on = (w.get("parsed") or {}).get("path_entities")
        if drawn_on is not None and drawn_on != row["path_star"]["entities"]:
            raise TracerError(f"sample {w['ex_id']}: drawn on another path than the pool's question {w['ex_id']} "
                              "(sampled from another RSFT pool? consolidate --pool names it)")
        trace = reward.answer_span(w["completion"])
        if w["prompt"] != row["prompt"]:
            if not w["correct"]:
                raise TracerError(f"sample {w['ex_id']}: drawn under another prompt and not correct; "
                                  "its answer letter cannot be carried over")
            trace = trace.rsplit("\n", 1)[0] + f"\n{dataset.ANSWER_TAG} {row['answer_star']}"
        rows.append(dict(row, ref={"trace": trace}))
    return rows


def _round_stat(r: int, questions: list[dict], scored: list[dict], winners: list[dict]) -> dict:
    return {
        "round": r,
        "phase": rsft_phase_name(r),
        "questions": len(questions),
        "samples": len(scored),
        "questions_with_winner": len({w["ex_id"] for w in winners}),
        "mean_sample_reward": sum(s["reward"]["total"] for s in scored) / max(len(scored), 1),
        "sample_accuracy": sum(s["correct"] for s in scored) / max(len(scored), 1),
        "winners": len(winners),
    }


def _check_rsft_resume(cfg: Config, run_path: Path) -> None:
    """A resumed RSFT may add rounds, nothing else: the rest of the config must match the run's
    (the caller rewrites it once its other checks pass)."""
    stored = run_path / "config.toml"
    if not stored.is_file():
        return
    old = load_config(stored).model_dump()
    new = cfg.model_dump()
    old["rsft"].pop("rounds"), new["rsft"].pop("rounds")
    if old != new:
        raise TracerError(f"{run_path}: cannot resume RSFT: the config differs from the run's config.toml "
                          "in more than rsft.rounds")


SAMPLE_CHUNK = 64  # questions per sampling call: what an interrupted round resumes from


class _OneBar:
    """Relays several generation calls' updates to ``progress``, whose task the caller starts
    and stops: one bar for all of them."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def start(self, description: str, total: int | None) -> None:
        pass

    def update(self, advance: int = 1, **info: Any) -> None:
        self.progress.update(advance, **info)

    def stop(self) -> None:
        pass

    def log(self, message: str) -> None:
        self.progress.log(message)


def _read_partial(path: Path, r: int) -> dict[str, dict[int, dict]]:
    """Round ``r``'s scored samples in ``path``: question id -> sample index -> row. A line cut
    short by a kill is dropped; a chunk sampled again after one overrides its earlier rows."""
    have: dict[str, dict[int, dict]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines(): see dataset._read_lines
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("round") == r:
                have.setdefault(row["ex_id"], {})[row["sample"]] = row
    return have


def _sample_round(cfg: Config, model: str | None, adapter: str, questions: list[dict], kg: KG, r: int,
                  progress: Progress, partial: Path, reuse: bool) -> tuple[list[dict], bool]:
    """Round r's scored samples, from ``adapter``, and whether all were reused.

    Each question gets rsft.k_samples samples, or with rsft.first_samples = f > 0, f samples first
    and the other K - f only when those f hold fewer than rsft.keep_top winners: rejection
    sampling stops at acceptance, so questions the adapter already solves cost f samples, not K.
    Questions are sampled :data:`SAMPLE_CHUNK` at a time (chunk c seeded by rsft.seed + r + 1000c,
    in the second stage + 1,000,000) and each chunk's scored samples are appended to ``partial``
    as it finishes. With ``reuse``, chunks already complete there are not sampled again, so an
    interrupted round resumes where it stopped and ends with the samples an uninterrupted one
    would have drawn. Rows come back per question in ``questions`` order, by sample index.
    """
    rc = cfg.rsft
    have = _read_partial(partial, r) if reuse else {}
    if not reuse:
        partial.unlink(missing_ok=True)
    stale = [qid for qid, rows in have.items() if max(rows) >= rc.k_samples]
    if stale:  # rows past k_samples were drawn under another K: those questions are sampled anew
        for qid in stale:
            del have[qid]
        dataset.write_jsonl(partial, [row for rows in have.values() for row in rows.values()])
    partial.parent.mkdir(parents=True, exist_ok=True)
    first = rc.first_samples or rc.k_samples
    reused = _sample_stage(cfg, model, adapter, questions, range(first), rc.seed + r, kg, r, progress, partial, have)
    more: set[str] = set()
    if first < rc.k_samples:
        more = {q["id"] for q in questions
                if len(select_winners([have[q["id"]][i] for i in range(first)], rc.keep_top, rc.min_reward,
                                      rc.require_correct)) < rc.keep_top}
        reused &= _sample_stage(cfg, model, adapter, [q for q in questions if q["id"] in more],
                                range(first, rc.k_samples), rc.seed + r + 1_000_000, kg, r, progress, partial, have)
    return [have[q["id"]][i] for q in questions for i in range(rc.k_samples if q["id"] in more else first)], reused


def _sample_stage(cfg: Config, model: str | None, adapter: str, questions: list[dict], indices: range, seed: int,
                  kg: KG, r: int, progress: Progress, partial: Path, have: dict[str, dict[int, dict]]) -> bool:
    """Samples ``indices`` of every question, in chunks (chunk c seeded ``seed + 1000c``); chunks
    whose rows ``have`` holds already are skipped. New rows go to ``have`` and ``partial``.
    Returns whether every chunk was there already."""
    rc = cfg.rsft
    k = len(indices)
    chunks = [questions[i : i + SAMPLE_CHUNK] for i in range(0, len(questions), SAMPLE_CHUNK)]
    todo = [c for c, chunk in enumerate(chunks) if not all(i in have.get(q["id"], {}) for q in chunk for i in indices)]
    jobs = [{"prompts": [q["prompt"] for q in chunks[c] for _ in range(k)], "max_tokens": rc.max_tokens,
             "temperature": rc.temperature, "top_p": rc.top_p, "seed": seed + 1000 * c,
             "batch_size": cfg.eval.batch_size} for c in todo]

    def score(j: int, completions: list[str]) -> None:
        rows = []
        for n, q in enumerate(chunks[todo[j]]):
            eps = _score_rows([q] * k, completions[n * k : (n + 1) * k], kg, cfg, rsft_phase_name(r))
            for i, e in zip(indices, eps):
                e["sample"], e["round"] = i, r
                have.setdefault(q["id"], {})[i] = e
            rows.extend(eps)
        with partial.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())

    if not questions:
        return True
    progress.start("generate", total=len(questions) * k)
    progress.update(sum(len(chunk) for c, chunk in enumerate(chunks) if c not in todo) * k)
    if jobs:
        with generation_pool(cfg, model, adapter) as pool:
            pool.map(jobs, _OneBar(progress), on_done=score)
    progress.stop()
    return not todo


def rsft(
    cfg: Config,
    *,
    adapter: str | None = None,
    pool: str | None = None,
    model: str | None = None,
    output: str | Path | None = None,
    run_dir: str | Path | None = None,
    allow_eval_overlap: bool = False,
    evaluate_rounds: bool = True,
    resume: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Rejection-sampling fine-tuning: sample K per question (or first f, then the rest where those
    f hold fewer than keep_top winners), keep KG-rewarded winners, fine-tune.

    Round r trains into ``models/rsft`` (r = 1) or ``models/rsft_r<r>`` of the run directory; the
    last round's adapter is also copied to ``output``. With ``resume``, rounds whose samples and
    adapter are already in the run directory are skipped, so an interrupted run, or one given more
    ``rsft.rounds``, continues where it stopped and ends as an uninterrupted run would.
    """
    progress = progress or NullProgress()
    rc = cfg.rsft
    kg = load_kg(cfg.data.kg)
    if pool is None:
        ensure_data(cfg)
    run_path = Path(run_dir) if run_dir else Path(cfg.run.runs_dir) / cfg.run.name
    if resume:
        _check_rsft_resume(cfg, run_path)
    adapter = adapter or str(runs.model_dir(run_path, "sft"))
    check_adapter_base(cfg, adapter, model)
    source = pool or str(split_path(cfg, "rsft"))
    pool_rows = load_split(cfg, "rsft", source, kg=kg)
    contaminated = guard_leakage(cfg, pool_rows, source, allow_eval_overlap, kg) or adapter_contaminated(adapter)
    replay_pool = load_split(cfg, "train", kg=kg) if rc.replay > 0 and split_path(cfg, "train").exists() else []
    if replay_pool:
        contaminated |= guard_leakage(cfg, replay_pool, str(split_path(cfg, "train")), allow_eval_overlap, kg)
    if resume and (run_path / "config.toml").is_file():  # the run now holds this many rounds
        runs.write_text_atomic(run_path / "config.toml", to_toml(cfg))
    by_id = {q["id"]: q for q in pool_rows}
    samples_file = run_path / "rsft_samples.jsonl"
    previous = dataset.read_jsonl(samples_file) if resume and samples_file.is_file() else []
    all_samples: list[dict] = []
    rounds = []
    current = adapter
    redone = False  # a round recomputed in this call makes every later round's partial samples stale
    for r in range(1, rc.rounds + 1):
        phase = rsft_phase_name(r)
        out_dir = runs.model_dir(run_path, phase)
        questions = round_questions(pool_rows, rc.max_questions, r, rc.rotate)
        done = [s for s in previous if s.get("round") == r]
        if done and runs.has_adapter(out_dir):
            all_samples.extend(done)
            stat = _round_stat(r, questions, done, [s for s in done if s.get("kept")])
            stat["resumed"] = True
            progress.log(f"RSFT round {r}: finished before, skipped")
        else:
            previous = []  # every later round depends on this one: redo them all
            (out_dir / "adapters.safetensors").unlink(missing_ok=True)  # a stale one would pass for finished
            t0 = time.perf_counter()
            partial = run_path / f"rsft_r{r}_samples.partial.jsonl"
            scored, reused = _sample_round(cfg, model, current, questions, kg, r, progress, partial,
                                           reuse=resume and not redone)
            redone = True
            winners = select_winners(scored, rc.keep_top, rc.min_reward, rc.require_correct)
            for w in winners:
                w["kept"] = True
            all_samples.extend(scored)
            dataset.write_jsonl(samples_file, all_samples)
            stat = _round_stat(r, questions, scored, winners)
            stat["sample_s"] = round(time.perf_counter() - t0, 2)
            staged = ""
            if rc.first_samples:  # the sample means then lean to the questions sampled K times
                stat["resampled_questions"] = len({s["ex_id"] for s in scored if s["sample"] >= rc.first_samples})
                staged = f" ({stat['resampled_questions']} sampled past the first {rc.first_samples})"
            progress.log(
                f"RSFT round {r}: {stat['questions_with_winner']}/{len(questions)} questions with a winner, "
                f"{len(scored)} samples{staged}, mean sample reward {stat['mean_sample_reward']:+.2f}, "
                f"{len(winners)} winners kept"
            )
            if winners:
                rows = winner_rows(winners, by_id)
                n_replay = min(int(round(rc.replay * len(rows))), len(replay_pool))
                rows += random.Random(rc.seed + r).sample(replay_pool, n_replay)
                # samples all reused: the same winners, so an interrupted round's training resumes too
                resume_train = reused and (out_dir / "checkpoint").exists()
                stat["train"] = _train(cfg, rc, rows, out_dir, model, resume_train, progress, init_adapter=current)
                _mark(out_dir, contaminated)
            else:
                progress.log(f"[yellow]RSFT round {r}: no sample qualified; the adapter is carried over unchanged[/yellow]")
                _copy_adapter(Path(current), out_dir)
                stat["skipped"] = True
            partial.unlink(missing_ok=True)  # kept until the round's adapter is saved
        current = str(out_dir)
        if evaluate_rounds:
            recorded = runs.recorded_phases(run_path).get(phase) if stat.get("resumed") else None
            stat["eval"] = recorded or evaluate(cfg, model=model, adapter=current, phase=phase, output=run_path,
                                                progress=progress, contaminated=contaminated)["entry"]
        rounds.append(stat)
    if output and Path(output) != Path(current):
        _copy_adapter(Path(current), Path(output))
        current = str(output)
    return {"rounds": rounds, "adapter": current, "samples": str(samples_file), "contaminated": contaminated}


def consolidation_rows(samples: list[dict], pool: list[dict], train_rows: list[dict], hops: list[int]) -> dict:
    """The last RSFT round's winners (as training rows) plus the training questions of ``hops`` hops
    and every renamed (counterfactual) training question.

    RSFT keeps chains long but wears down the recall of single facts; one pass over both restores
    the facts without shortening the chains. Renamed questions can only be answered by reading the
    prompt's facts.
    """
    kept = [s for s in samples if s.get("kept")]
    last = max((s["round"] for s in kept), default=None)
    winners = [s for s in kept if s["round"] == last]
    facts = [r for r in train_rows if r["hop_len"] in hops or r["meta"].get("counterfactual")]
    return {"round": last, "winners": winner_rows(winners, {q["id"]: q for q in pool}), "facts": facts}


def consolidate(
    cfg: Config,
    *,
    run_dir: str | Path | None = None,
    adapter: str | None = None,
    samples: str | None = None,
    pool: str | None = None,
    model: str | None = None,
    output: str | Path | None = None,
    allow_eval_overlap: bool = False,
    resume: bool = False,
    evaluate_after: bool = True,
    progress: Progress | None = None,
) -> dict:
    """After RSFT: one SFT pass continuing the last round's adapter on its winners plus short questions.

    Reads ``rsft_samples.jsonl`` of the run directory (or ``samples``, drawn from the rsft split or
    ``pool``), continues the last round's adapter (or ``adapter``) into ``models/consolidate`` (or
    ``output``), then evaluates it as the phase ``consolidate``. When no round kept a winner, it trains on the short questions alone.
    """
    progress = progress or NullProgress()
    run_path = Path(run_dir) if run_dir else Path(cfg.run.runs_dir) / cfg.run.name
    samples_file = Path(samples) if samples else run_path / "rsft_samples.jsonl"
    if not samples_file.is_file():
        raise TracerError(f"{samples_file}: no RSFT samples to consolidate; run `tracer rsft` first")
    kg = load_kg(cfg.data.kg)
    ensure_data(cfg)
    train_source = str(split_path(cfg, "train"))
    scored = dataset.read_jsonl(samples_file)
    parts = consolidation_rows(scored, load_split(cfg, "rsft", pool, kg=kg), load_split(cfg, "train", kg=kg),
                               cfg.consolidate.hops)
    last = parts["round"]
    if last is None:  # every round carried its adapter over unchanged: rehearse the facts alone
        if not scored:
            raise TracerError(f"{samples_file}: no RSFT samples in it; nothing to consolidate")
        if not parts["facts"]:
            raise TracerError(f"{samples_file}: no RSFT round kept a winner and there are no training "
                              f"questions of {cfg.consolidate.hops} hops; nothing to consolidate")
        last = max(int(s.get("round", 1)) for s in scored)
        progress.log(f"[yellow]consolidate: no RSFT round kept a winner; training on the facts alone, "
                     f"from round {last}'s adapter[/yellow]")
    adapter = adapter or str(runs.model_dir(run_path, rsft_phase_name(last)))
    check_adapter_base(cfg, adapter, model)
    rows = parts["winners"] + parts["facts"]
    contaminated = guard_leakage(cfg, rows, f"{samples_file} + {train_source}", allow_eval_overlap, kg)
    contaminated |= adapter_contaminated(adapter)
    out_dir = Path(output) if output else runs.model_dir(run_path, "consolidate")
    renamed = sum(bool(r["meta"].get("counterfactual")) for r in parts["facts"])
    progress.log(f"consolidate: {len(parts['winners'])} winners of RSFT round {last} + "
                 f"{len(parts['facts']) - renamed} training questions of {cfg.consolidate.hops} hops + "
                 f"{renamed} renamed ones")
    stats = _train(cfg, cfg.consolidate, rows, out_dir, model, resume, progress, init_adapter=adapter)
    _mark(out_dir, contaminated)
    out = {"train": stats, "adapter": str(out_dir), "winners": len(parts["winners"]), "facts": len(parts["facts"]),
           "round": parts["round"], "contaminated": contaminated, "run_dir": str(run_path)}
    if evaluate_after:
        out["eval"] = evaluate(cfg, model=model, adapter=str(out_dir), phase="consolidate", output=run_path,
                               progress=progress, contaminated=contaminated)["entry"]
    return out


# ----------------------------------------------------------------------------------------- run


def run(cfg: Config, *, force: bool = False, resume: bool = False, allow_eval_overlap: bool = False,
        progress: Progress | None = None) -> dict:
    """The whole pipeline into one run directory; ``resume`` skips finished phases."""
    progress = progress or NullProgress()
    run_dir = Path(cfg.run.runs_dir) / cfg.run.name
    planned = _planned_phases(cfg)
    stored, config_toml = run_dir / "config.toml", to_toml(cfg)
    if resume and stored.is_file() and load_config(stored) == cfg:
        # the same settings, written by a tracer that had fewer knobs: not a config change
        runs.write_text_atomic(stored, config_toml)
    action = runs.check_run_dir(run_dir, config_toml, force=force, resume=resume)
    data_summary = ensure_data(cfg)  # bad data or a refused overlap stop the run before its directory is written
    contaminated = False
    for split in ["train"] + (["rsft"] if "rsft" in cfg.run.phases else []):
        contaminated |= guard_leakage(cfg, load_split(cfg, split), str(split_path(cfg, split)), allow_eval_overlap)
    runs.prepare_run(run_dir, config_toml, planned, cfg.run.seed, action)
    done = runs.finished_phases(run_dir) if resume else set()
    if contaminated:
        runs.update_meta(run_dir, contaminated=True)
    results: dict[str, Any] = {"run_dir": str(run_dir), "data": data_summary, "phases": {}}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        runs.update_meta(run_dir, timings={name: round(time.perf_counter() - t0, 2)})
        return out

    if "base" in cfg.run.phases and "base" not in done:
        results["phases"]["base"] = timed("base", lambda: evaluate(
            cfg, phase="base", output=run_dir, progress=progress, contaminated=contaminated))
    sft_dir = runs.model_dir(run_dir, "sft")
    if "sft" in cfg.run.phases and "sft" not in done:
        if not runs.has_adapter(sft_dir):
            stats = sft(cfg, output=sft_dir, resume=resume and (sft_dir / "checkpoint").exists(),
                        allow_eval_overlap=allow_eval_overlap, progress=progress)
            runs.update_meta(run_dir, timings={"sft_train": stats["wall_s"]})  # across interruptions
        results["phases"]["sft"] = timed("sft", lambda: evaluate(
            cfg, adapter=str(sft_dir), phase="sft", output=run_dir, progress=progress, contaminated=contaminated))
    rsft_phases = [p for p in planned if p.startswith("rsft")]
    if "rsft" in cfg.run.phases and not set(rsft_phases) <= done:
        results["rsft"] = timed("rsft", lambda: rsft(
            cfg, adapter=str(sft_dir), run_dir=run_dir, allow_eval_overlap=allow_eval_overlap, resume=resume,
            progress=progress))
    cons_dir = runs.model_dir(run_dir, "consolidate")
    if "consolidate" in cfg.run.phases and "consolidate" not in done:
        if not runs.has_adapter(cons_dir):
            out = consolidate(cfg, run_dir=run_dir, output=cons_dir, resume=resume and (cons_dir / "checkpoint").exists(),
                              allow_eval_overlap=allow_eval_overlap, evaluate_after=False, progress=progress)
            runs.update_meta(run_dir, timings={"consolidate_train": out["train"]["wall_s"]})
        results["phases"]["consolidate"] = timed("consolidate", lambda: evaluate(
            cfg, adapter=str(cons_dir), phase="consolidate", output=run_dir, progress=progress,
            contaminated=contaminated))
    runs.update_meta(run_dir, finished_at=runs.now())
    results["metrics"] = runs.read_json(run_dir / "metrics.json", default={})
    return results


def _planned_phases(cfg: Config) -> list[str]:
    phases = []
    for p in cfg.run.phases:
        if p == "rsft":
            phases += [rsft_phase_name(r) for r in range(1, cfg.rsft.rounds + 1)]
        else:
            phases.append(p)
    return phases


def config_summary(cfg: Config) -> str:
    return json.dumps(cfg.model_dump(), indent=2)
