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
