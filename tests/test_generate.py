"""tracer.generate: chat format, batched left-padded decoding, seeding, stop rules."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from tracer import format as F
from tracer import generate as G
from tracer import sampling as S

from tiny_model import build_tiny_model  # tests/tiny_model.py

CHAT_EXAMPLE = (
    "<|im_start|>system\nYou answer multi-hop questions about a software troubleshooting knowledge "
    "graph.<|im_end|>\n<|im_start|>user\nQuestion: What fixes the crash caused by E1?\nA) E2\nB) E3\n"
    "C) E4\nD) E5<|im_end|>\n<|im_start|>assistant\nTRACE: E0 -caused_by-> E1 -fixed_by-> E2\n"
    "ANSWER: C<|im_end|>\n"
)
TEXTS = [CHAT_EXAMPLE] * 10 + ["the quick brown fox jumps over the lazy dog " * 5]

PROMPTS = [
    "Question: What fixes E1?",
    "Answer in exactly this format:\nTRACE: <entity -relation-> entity ...>\nANSWER: <A|B|C|D>\n\n"
    "Question: What fixes the crash caused by E1 and which component does it depend on?\n"
    "A) E2\nB) E3\nC) E4\nD) E5",
    "hi",
    "Question: What caused E7?\nA) E1\nB) E2\nC) E3\nD) E4",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model with large random weights, so greedy outputs depend on the whole context."""
    from mlx_lm import load

    path = build_tiny_model(tmp_path_factory.mktemp("gen") / "m", TEXTS)
    model, tok = load(str(path))
    mx.random.seed(3)
    params = [
        (k, mx.ones(v.shape) if "norm" in k else mx.random.normal(v.shape) * 0.3)
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model, tok


class Scripted(nn.Module):
    """A fake model whose greedy continuation is ``script`` for every row, whatever the prompt."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.layers = []
        self.script = script
        self.vocab = vocab
        self.t = 0

    def __call__(self, inputs, cache=None):
        B, L = inputs.shape
        if L > 1:  # prefill
            self.t = 0
        tok = self.script[min(self.t, len(self.script) - 1)]
        self.t += 1
        logits = mx.zeros((B, L, self.vocab))
        return logits + 10.0 * (mx.arange(self.vocab) == tok)


def scripted(tok, text: str, tail: list[int] | None = None) -> Scripted:
    ids = list(tok.encode(text, add_special_tokens=False)) + (tail or [])
    return Scripted(ids, len(tok.get_vocab()))


# --- chat format -------------------------------------------------------------------------------


def test_chat_prompt_and_encode_chat_single_bos(tiny):
    _, tok = tiny
    text = F.chat_prompt(tok, "Q?")
    assert text.startswith("<|im_start|>system\n" + F.SYSTEM_PROMPT)
    assert text.endswith("<|im_start|>assistant\n")
    assert "Q?" in text
    ids = F.encode_chat(tok, "Q?")
    bos = tok.bos_token_id
    assert ids[0] == bos and ids[1] != bos
    assert tok.decode(ids) == text


# --- batching ----------------------------------------------------------------------------------


def test_batched_greedy_equals_single_prompt_greedy(tiny):
    model, tok = tiny
    lengths = {len(F.encode_chat(tok, p)) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS)  # all different: left padding is exercised
    batched = G.generate(model, tok, PROMPTS, max_tokens=24, stop_after_answer=False)
    single = [G.generate(model, tok, [p], max_tokens=24, stop_after_answer=False)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) == len(batched)  # the outputs really depend on the prompt
    small = G.generate(model, tok, PROMPTS, max_tokens=24, stop_after_answer=False, batch_size=3)
    assert small == single


def test_max_tokens_bound_and_order(tiny):
    model, tok = tiny
    toks = G.generate_tokens(model, tok, PROMPTS, max_tokens=7, stop_after_answer=False)
    assert len(toks) == len(PROMPTS)
    assert all(len(t) <= 7 for t in toks)
    stops = S.stop_token_ids(tok)
    assert not any(s in t for t in toks for s in stops)
    assert G.generate(model, tok, [], max_tokens=5) == []


def test_completions_exclude_prompt(tiny):
    model, tok = tiny
    outs = G.generate(model, tok, PROMPTS, max_tokens=10, stop_after_answer=False)
    for p, o in zip(PROMPTS, outs):
        assert not o.startswith(F.chat_prompt(tok, p))
        assert not o.startswith(p)
    model = scripted(tok, "TRACE: E0")
    n = len(model.script)
    assert G.generate(model, tok, PROMPTS, max_tokens=n, stop_after_answer=False) == ["TRACE: E0"] * 4


# --- sampling ----------------------------------------------------------------------------------


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.95, stop_after_answer=False)
    a = G.generate(model, tok, PROMPTS, seed=1, **kw)
    b = G.generate(model, tok, PROMPTS, seed=1, **kw)
    c = G.generate(model, tok, PROMPTS, seed=2, **kw)
    assert a == b
    assert a != c


def test_sample_k_shape_and_determinism(tiny):
    model, tok = tiny
    kw = dict(max_tokens=12, temperature=1.0, seed=5, stop_after_answer=False)
    s1 = G.sample_k(model, tok, PROMPTS[:3], 4, **kw)
    s2 = G.sample_k(model, tok, PROMPTS[:3], 4, **kw)
    assert s1 == s2
    assert [len(x) for x in s1] == [4, 4, 4]
    assert len(set(s1[1])) > 1  # the k samples differ
    refilled = [G.sample_k(model, tok, PROMPTS[:3], 4, batch_size=5, **kw) for _ in range(2)]
    assert refilled[0] == refilled[1]  # seeded through refills too
    assert all(len(set(group)) > 1 for group in refilled[0][:2])
    with pytest.raises(ValueError):
        G.sample_k(model, tok, PROMPTS, 0)


# --- stop rules (scripted model) ---------------------------------------------------------------


def test_stop_after_answer_ends_with_the_answer_line(tiny):
    _, tok = tiny
    model = scripted(tok, "TRACE: E0 -caused_by-> E1\nANSWER: C\nTRACE: more text after")
    out = G.generate(model, tok, PROMPTS, max_tokens=80)
    assert out == ["TRACE: E0 -caused_by-> E1\nANSWER: C"] * len(PROMPTS)
    toks = G.generate_tokens(model, tok, PROMPTS[:1], max_tokens=80)[0]
    full = list(tok.encode("TRACE: E0 -caused_by-> E1\nANSWER: C\nTRACE: more text after",
                           add_special_tokens=False))
    assert len(toks) < len(full)  # decoding stopped early, not just the text cut


@pytest.mark.parametrize("answer", ["Database timeout", "B and C", "C"])
def test_the_answer_stop_keeps_the_verdict_of_the_whole_text(tiny, answer):
    """A letter that starts a longer answer is not cut out of it: the stop waits for the line's end."""
    from tracer.reward import EntityMatcher, parse_completion

    _, tok = tiny
    text = f"TRACE: E0 -caused_by-> E1\nANSWER: {answer}\nmore"
    out = G.generate(scripted(tok, text), tok, PROMPTS[:1], max_tokens=80)[0]
    assert out == f"TRACE: E0 -caused_by-> E1\nANSWER: {answer}"
    m = EntityMatcher(["E0", "E1"])
    want = parse_completion(text, m)
    assert (parse_completion(out, m).valid_format, parse_completion(out, m).answer) == (want.valid_format, want.answer)


def test_no_answer_stop_runs_to_max_tokens(tiny):
    _, tok = tiny
    text = "TRACE: E0 -caused_by-> E1\nANSWER: C\nTRACE: more text after"
    model = scripted(tok, text)
    n = len(tok.encode(text, add_special_tokens=False))
    out = G.generate(model, tok, PROMPTS[:2], max_tokens=n, stop_after_answer=False)
    assert out == [text, text]
    toks = G.generate_tokens(model, tok, PROMPTS[:2], max_tokens=5, stop_after_answer=False)
    assert [len(t) for t in toks] == [5, 5]


def test_stop_at_eos_excludes_stop_token(tiny):
    _, tok = tiny
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert eos in S.stop_token_ids(tok)
    model = scripted(tok, "TRACE: E0", tail=[eos] + list(tok.encode(" junk", add_special_tokens=False)))
    assert G.generate(model, tok, PROMPTS, max_tokens=50) == ["TRACE: E0"] * len(PROMPTS)


@pytest.mark.parametrize("layers", ["cpu_ops", "grouped"])
def test_greedy_matches_mlx_lm_reference(tiny, layers, monkeypatch):
    """Independent check of the batched/prefix-shared path, with either set of fast layers,
    against mlx-lm's own single stream."""
    from mlx_lm import stream_generate

    from mlx_lm.models import llama

    model, tok = tiny
    if layers == "cpu_ops" and not G.cpu_ops.available(model):
        pytest.skip("cpu_ops needs the CPU backend and a C++ compiler")
    monkeypatch.setattr(G.cpu_ops, "available", lambda m=None: layers == "cpu_ops")
    for layer in model.layers:  # the module's model: earlier tests may have switched its layers
        layer.self_attn.__class__, layer.mlp.__class__ = llama.Attention, llama.MLP
    stops = S.stop_token_ids(tok)
    ours = G.generate_tokens(model, tok, PROMPTS, max_tokens=20, stop_after_answer=False)
    want = {"cpu_ops": (G.cpu_ops.CpuAttention, G.cpu_ops.CpuMLP), "grouped": (G.GroupedDecodeAttention, llama.MLP)}
    assert all((type(layer.self_attn), type(layer.mlp)) == want[layers] for layer in model.layers)
    for layer in model.layers:  # the reference runs mlx-lm's own layers
        layer.self_attn.__class__, layer.mlp.__class__ = llama.Attention, llama.MLP
    for p, o in zip(PROMPTS, ours):  # token ids: random weights emit bytes that decode differently
        ref = [r.token for r in stream_generate(model, tok, F.encode_chat(tok, p), max_tokens=20)]
        assert o == [t for t in ref if t not in stops]


def test_shared_prefix_cache_matches_plain_prefill(tiny):
    model, tok = tiny
    enc = [F.encode_chat(tok, p) for p in PROMPTS]
    P = F.shared_prefix_len(enc)
    assert P > 8
    stopper = S.RowStopper(tok, 16, False)
    greedy = S.make_sampler(0.0, 1.0, mx.random.key(0))
    plain = G.decode_batch(model, enc, stopper, greedy)
    shared = G.decode_batch(model, enc, stopper, greedy, prefix_kv=G.prefix_cache(model, enc[0][:P]))
    assert plain == shared


def test_repeated_prompts_prefilled_once_decode_like_distinct_ones(tiny):
    """K copies of a prompt share one prefill; each copy still decodes (and samples) on its own."""
    model, tok = tiny
    greedy = G.sample_k(model, tok, PROMPTS, 3, max_tokens=12, temperature=0.0, stop_after_answer=False)
    single = G.generate(model, tok, PROMPTS, max_tokens=12, stop_after_answer=False)
    assert greedy == [[s] * 3 for s in single]
    few_slots = G.sample_k(model, tok, PROMPTS, 3, max_tokens=12, temperature=0.0, stop_after_answer=False,
                           batch_size=4)
    assert few_slots == greedy  # copies split across refills decode alike

    enc = [F.encode_chat(tok, p) for p in PROMPTS[:2]]
    batch = [enc[0]] * 3 + [enc[1]] * 2
    stopper = S.RowStopper(tok, 12, False)
    calls = []

    class Spy:  # records the batch size of the prefill
        def __init__(self, m):
            self.m, self.layers, self.args = m, m.layers, m.args

        def __call__(self, x, cache=None):
            calls.append(x.shape)
            return self.m(x, cache=cache)

    spy = Spy(model)
    sampled = G.decode_batch(spy, batch, stopper, S.make_sampler(1.0, 1.0, mx.random.key(7)))
    assert calls[0][0] == 2  # prefilled the 2 distinct prompts, not 5 rows
    assert calls[1][0] == 5  # then every row decodes
    assert len({tuple(s) for s in sampled[:3]}) > 1  # copies draw their own samples



def test_continuous_batching_refills_rows_and_matches_single_prompts(tiny):
    """With fewer slots than prompts, finished rows are replaced by waiting prompts mid-decode;
    every prompt still decodes exactly as it would alone, and no step exceeds the batch size."""
    model, tok = tiny
    enc = [F.encode_chat(tok, p) for p in PROMPTS + [p + " Why?" for p in PROMPTS]]

    class Varying(S.RowStopper):  # rows end at different steps: after 3 + (first token % 7) tokens
        def push(self, out, tok_id):
            out.append(tok_id)
            return len(out) >= 3 + out[0] % 7

    shapes = []

    class Spy:
        def __init__(self, m):
            self.m, self.layers, self.args = m, m.layers, m.args

        def __call__(self, x, cache=None):
            shapes.append(x.shape)
            return self.m(x, cache=cache)

    stopper = Varying(tok, 10, False)
    greedy = S.make_sampler(0.0, 1.0, mx.random.key(0))
    batched = G.decode_batch(Spy(model), enc, stopper, greedy, batch_size=3)
    single = [G.decode_batch(model, [e], stopper, greedy)[0] for e in enc]
    assert batched == single
    assert len({len(o) for o in batched}) > 2  # rows really finish at different steps
    P = F.shared_prefix_len(enc)
    assert G.decode_batch(model, enc, stopper, greedy, prefix_kv=G.prefix_cache(model, enc[0][:P]),
                          batch_size=3) == single  # appended rows over the shared-prefix cache too
    assert max(b for b, n in shapes if n == 1) <= 3
    prefills = [i for i, (b, n) in enumerate(shapes) if n > 1]
    assert sum(shapes[i][0] for i in prefills) == len(enc)  # every prompt prefilled once
    # some refill joined rows still decoding: the step after it is wider than the refill itself
    assert any(shapes[i + 1][0] > shapes[i][0] for i in prefills[1:] if i + 1 < len(shapes))


def test_decode_attention_matches_fast_sdpa():
    mx.random.seed(0)
    B, H, Hk, T, D = 3, 6, 2, 9, 8
    q = mx.random.normal((B, H, 1, D))
    k, v = mx.random.normal((B, Hk, T, D)), mx.random.normal((B, Hk, T, D))
    left = mx.array([0, 2, 5])[:, None, None, None]
    bool_mask = mx.arange(T)[None, None, None, :] >= left  # (B, 1, 1, T): left padding
    additive = mx.where(bool_mask, 0.0, -1e9)
    per_head = mx.broadcast_to(bool_mask, (B, H, 1, T))
    for mask in (None, bool_mask, additive, per_head):
        ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
        assert mx.allclose(G.decode_attention(q, k, v, 0.3, mask), ref, atol=1e-5).item()
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=bool_mask)
    other = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert not mx.allclose(ref, other, atol=1e-3).item()  # the mask matters in this test
