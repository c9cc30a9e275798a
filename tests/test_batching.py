"""Training examples and batches (tracer.batching): chat-encoded pairs, the answer's token,
batches by (seed, step), collated rows with the shared prefix cut off."""

from __future__ import annotations

from tracer import batching


class CharTokenizer:
    """One token per character (its code point); the end-of-turn token is 0."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


def test_batches_are_length_grouped_and_deterministic():
    lengths = [10, 200, 11, 199, 12, 198, 13, 197] * 8
    a = batching.epoch_batches(lengths, 4, seed=3, epoch=0)
    assert a == batching.epoch_batches(lengths, 4, seed=3, epoch=0)
    assert a != batching.epoch_batches(lengths, 4, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in a)
    assert waste < 0.05 * sum(lengths)
    examples = [([0] * n, 1) for n in lengths]
    assert batching.batches(examples, 4, seed=3, epoch=0) == a
    # step s's batch is a pure function of (seed, s): epoch 1 step 3 == batches(epoch=1)[3]
    per_epoch = len(a)
    assert batching.batch_for_step(per_epoch + 3, lengths, 4, 3, None, False) == batching.epoch_batches(lengths, 4, 3, 1)[3]
    hops = [1, 3, 2, 1] * 16
    cur = batching.batches(examples, 4, seed=3, epoch=0, curriculum=True, hop_lens=hops)
    flat = [hops[i] for b in cur for i in b]
    assert flat == sorted(flat)


def test_answer_indices_find_the_letter_before_the_end_of_turn():
    tok = CharTokenizer()
    pairs = [("Q", "TRACE: a\nANSWER: B"), ("Q", "TRACE: a"), ("Q", "ANSWER: A\nANSWER: C")]
    examples = [(tok.encode("PROMPT") + tok.encode(c) + [0], 6) for _, c in pairs]
    at = batching.answer_indices(tok, pairs, examples)
    assert [chr(examples[0][0][at[0]]), at[1], chr(examples[2][0][at[2]])] == [" ", -1, " "]
    assert examples[0][0][at[0]:-1] == tok.encode(" B")  # the text after the last ANSWER:
    cut = [(examples[0][0][:8], 6)]  # truncation took the answer
    assert batching.answer_indices(tok, pairs[:1], cut) == [-1]


def test_collate_cuts_the_shared_prefix_and_pads_to_multiples():
    prefix = list(range(1, 11))  # 10 tokens every row starts with
    examples = [(prefix + [20, 21, 22], 11), (prefix + [30, 31, 32, 33, 34], 12)]
    b = batching.collate(examples, share_prefix=True)
    assert b.prefix.tolist() == [prefix] and b.inputs.shape == (2, 4)  # longest row - 1 - prefix
    assert b.tokens == 13 + 15 and b.weights is None
    assert b.targets.tolist() == [21, 22, 32, 33, 34]  # completion tokens only
    flat = batching.collate(examples, share_prefix=False)
    assert flat.prefix is None and flat.inputs.shape == (2, 14) and flat.targets.tolist() == b.targets.tolist()
    padded = batching.collate(examples, share_prefix=True, pad=(8, 32))
    assert padded.inputs.shape == (2, 8) and padded.positions.size == 32
    assert padded.weights.tolist() == [1.0] * 5 + [0.0] * 27
    assert batching.round_up(33, 32) == 64 and batching.round_up(32, 32) == 32
