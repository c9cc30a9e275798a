"""Token choice and stop rules of the decode loop (tracer.sampling), on logits and a character tokenizer."""

from __future__ import annotations

import mlx.core as mx

from tracer import sampling as S


class CharTokenizer:
    """One token per character; ``<|im_end|>`` is 1, and the eos id 2."""

    eos_token_id = 2

    def get_vocab(self):
        return {"<|im_end|>": 1, "\n": 10, "a\nb": 300, "x": 120}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_top_p_keeps_nucleus():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = S.apply_top_p(logits, 0.7)
    assert mx.isinf(kept).tolist() == [[False, False, True, True]]
    assert not mx.isinf(S.apply_top_p(logits, 1.0)).any().item()


PEAKED = [6.0, 5.5, 5.0, 4.0, 3.5] + [-10.0] * 995  # nucleus at 0.95: the first 4 tokens
FLAT = [i / 200 for i in range(1000)]  # distinct; 95% of the mass needs hundreds of the 1000 tokens


def _draws(rows: list[list[float]], top_p: float, k: int, n: int = 4000) -> tuple[list[list[int]], list[list[float]]]:
    """Per row of logits, ``n`` draws of :func:`S.sample_top_p` (rows interleaved in one batch) and the
    nucleus probabilities :func:`S.apply_top_p` gives over the whole vocabulary."""
    lp = mx.array(rows)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    want = mx.softmax(S.apply_top_p(lp, top_p), axis=-1).tolist()
    batch = mx.concatenate([lp] * n)  # row j of the batch is rows[j % len(rows)]
    drawn = S.sample_top_p(batch, top_p, mx.random.key(3), k=k).tolist()
    return [drawn[j :: len(rows)] for j in range(len(rows))], want


def test_top_p_sampling_among_candidates_is_the_full_nucleus_distribution():
    # the nucleus (4 tokens) lies inside the 8 candidates: drawn among them
    (draws,), (want,) = _draws([PEAKED], 0.95, k=8)
    kept = [i for i, p in enumerate(want) if p > 0]
    assert kept == [0, 1, 2, 3] and set(draws) <= set(kept)
    for i in kept:  # each nucleus token as often as its renormalised probability (4000 draws: sd <= 0.008)
        assert abs(draws.count(i) / len(draws) - want[i]) < 0.04, (i, draws.count(i), want[i])
    # the same through the decode loop's sampler (temperature 1: its log-probs via cpu_ops on a CPU)
    sampled = S.make_sampler(1.0, 0.95, mx.random.key(5))(mx.array([PEAKED] * 4000)).tolist()
    for i in kept:
        assert abs(sampled.count(i) / len(sampled) - want[i]) < 0.04, (i, sampled.count(i), want[i])
    assert set(sampled) <= set(kept)


def test_top_p_sampling_draws_a_wider_nucleus_from_the_whole_vocabulary():
    # in one batch, flat rows draw beyond any 8 candidates while peaked rows keep to their nucleus
    (flat, peaked), (want_flat, _) = _draws([FLAT, PEAKED], 0.95, k=8, n=2000)
    assert 0 < want_flat.count(0.0) < 1000 - 8  # the nucleus drops some tokens and needs more than 8
    assert len(set(flat)) > 100 and all(want_flat[t] > 0 for t in flat)
    assert set(peaked) == {0, 1, 2, 3}


def _logprobs(head: list[float], k: int = 1000) -> list[float]:
    """Log-probabilities of ``k`` tokens: ``head``'s probabilities, the rest spread evenly."""
    rest = (1.0 - sum(head)) / (k - len(head))
    return [float(mx.log(mx.array(p)).item()) for p in head + [rest] * (k - len(head))]


def test_only_rows_whose_nucleus_may_pass_the_candidates_sort_the_vocabulary(monkeypatch):
    shapes = []
    real = S.apply_top_p
    monkeypatch.setattr(S, "apply_top_p", lambda lp, top_p: shapes.append(tuple(lp.shape)) or real(lp, top_p))
    inside = _logprobs([0.96 / 7] * 7 + [0.01])  # the 7 most likely of 8 candidates hold 0.96 >= 0.95
    boundary = _logprobs([0.94 / 7] * 7 + [0.02])  # they hold 0.94: the 8th may be the nucleus' edge
    S.sample_top_p(mx.array([inside, inside]), 0.95, mx.random.key(0), k=8)
    assert shapes == [(2, 8)]  # no full sort
    shapes.clear()
    flat = mx.array(FLAT) - mx.logsumexp(mx.array(FLAT))
    S.sample_top_p(mx.stack([mx.array(inside), mx.array(boundary), flat, mx.array(inside)]), 0.95,
                   mx.random.key(0), k=8)
    assert shapes == [(4, 8), (2, 1000)]  # the boundary and flat rows alone


def test_sampler_is_greedy_at_zero_temperature_and_seeded_above():
    logits = mx.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    assert S.make_sampler(0.0, 1.0, mx.random.key(0))(logits).tolist() == [1, 0]
    draws = [S.make_sampler(1.0, 1.0, mx.random.key(4)) for _ in range(2)]
    a = [draws[0](logits).tolist() for _ in range(5)]
    assert a == [draws[1](logits).tolist() for _ in range(5)]  # the same key: the same tokens
    assert len({tuple(x) for x in a}) > 1  # the key is split once per call


def test_stop_tokens_and_newline_tokens():
    tok = CharTokenizer()
    assert S.stop_token_ids(tok) == {1, 2}
    assert S.newline_tokens(tok) == frozenset({10, 300})


def test_row_stopper_ends_at_a_stop_token_the_answer_line_or_max_tokens():
    tok = CharTokenizer()
    stopper = S.RowStopper(tok, max_tokens=40, stop_after_answer=True)
    out: list[int] = []
    done = [stopper.push(out, ord(c)) for c in "TRACE: x\nANSWER: B\n"]
    assert done == [False] * (len(done) - 1) + [True]  # the newline that ends the ANSWER line
    assert S.finish_text(tok, out) == "TRACE: x\nANSWER: B" and S.finish_text(tok, out, False).endswith("B\n")
    out = []
    assert stopper.push(out, 1) and out == []  # a stop token is not recorded
    short = S.RowStopper(tok, max_tokens=3, stop_after_answer=False)
    out = []
    assert [short.push(out, ord(c)) for c in "TRA"] == [False, False, True]
