"""The completion format (tracer.format): prompts, facts, reference traces, reading completions,
trace nodes, the stop rule and the chat template's token helpers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tracer import format as F
from tracer.errors import TracerError
from tracer.kg import Edge
from tracer.reward import EntityMatcher

M = EntityMatcher(["E0", "E1", "E2"])


# --- prompts, facts, reference traces ------------------------------------------------------------


def test_reference_trace_format():
    edges = [{"src": "E0", "rel": "caused_by", "dst": "E1"}, {"src": "E1", "rel": "fixed_by", "dst": "E2"}]
    assert F.reference_trace(["E0", "E1", "E2"], edges, "C") == "TRACE: E0 -caused_by-> E1 -fixed_by-> E2\nANSWER: C"
    with pytest.raises(TracerError):
        F.reference_trace(["E0", "E1"], edges, "A")


def test_build_prompt_contents():
    opts = {"A": "X1", "B": "X2", "C": "X3", "D": "X4"}
    p = F.build_prompt("Which?", opts)
    assert "Answer in exactly this format:\nTRACE: <entity -relation-> entity ...>\nANSWER: <A|B|C|D>" in p
    assert "Facts:" not in p
    assert p.endswith("Which?\nA) X1\nB) X2\nC) X3\nD) X4")
    pf = F.build_prompt("Which?", opts, ["X1 -caused_by-> X2"])
    assert "Facts:\nX1 -caused_by-> X2" in pf
    assert F.SYSTEM_PROMPT and len(F.SYSTEM_PROMPT) < 200


def test_facts_round_trip_from_every_edge_shape():
    for e in (Edge("A", "r", "B"), {"src": "A", "rel": "r", "dst": "B"}, ("A", "r", "B"), ["A", "r", "B"]):
        assert F.edge_tuple(e) == ("A", "r", "B")
        assert F.format_fact(e) == "A -r-> B"
    assert F.parse_fact("A -r-> B") == ("A", "r", "B")
    assert F.is_fact("A -r-> B") and not F.is_fact("A r B") and not F.is_fact("A -r-> B C")


def test_reference_trace_reads_back_as_its_path():
    edges = [("E0", "a", "E1"), ("E1", "b", "E2")]
    text = F.reference_trace(["E0", "E1", "E2"], edges, "B")
    p = F.parse_completion(text, M)
    assert p.valid_format and p.answer == "B" and p.trace_entities == ["E0", "E1", "E2"]
    assert F.trace_steps(p.trace_text) == (["E0", "E1", "E2"], ["a", "b"])


# --- reading a completion ------------------------------------------------------------------------


def test_trace_and_answer_take_the_first_answer_line_after_the_trace():
    text = "ANSWER: A\nTRACE: E0 -a-> E1\nANSWER: C\nANSWER: D"
    t, a = F.trace_and_answer(text)
    assert t.start() == len("ANSWER: A\n") and a.group(0) == "ANSWER: C"
    assert F.trace_and_answer("no tags") == (None, None)
    assert F.trace_and_answer("TRACE: E0")[1] is None


def test_parse_completion_invalid_forms():
    assert F.parse_completion("", M) == F.Parsed(False, None, "", [])
    assert F.parse_completion("TRACE: E0 -a-> E1", M) == F.Parsed(False, None, "E0 -a-> E1", ["E0", "E1"])
    empty = F.parse_completion("TRACE:\nANSWER: B", M)
    assert not empty.valid_format and empty.answer == "B"  # the letter is read, the trace is empty
    assert F.parse_completion("TRACE: E0\nANSWER: E", M).answer is None


def test_answer_span_is_what_the_parser_reads():
    text = "Thinking.\nTRACE: E0 -a-> E1\nANSWER: C\nmore words"
    assert F.answer_span(text) == "TRACE: E0 -a-> E1\nANSWER: C"
    assert F.parse_completion(F.answer_span(text), M) == F.parse_completion(text, M)
    assert F.answer_span("  no answer  ") == "no answer"


def test_answer_text_follows_the_last_answer_tag():
    assert F.answer_text("TRACE: x\nANSWER: B") == " B"
    assert F.answer_text("ANSWER: A\nANSWER: C.") == " C."
    assert F.answer_text("TRACE: x") is None


# --- trace nodes ---------------------------------------------------------------------------------


def test_trace_nodes_and_steps():
    assert F.trace_nodes("`S` -r-> A ->B.") == ["S", "A", "B"] and F.trace_nodes("  ") == []
    assert F.trace_steps("S -r-> A -> B") == (["S", "A", "B"], ["r", ""])
    assert F.trace_steps("") == ([], [])
    assert F.trace_hops("A -x-> B -y-> NotInTheKG") == 2 and F.trace_hops("A") == 0


def test_parsed_nodes_reads_old_rows_by_their_entities():
    assert F.parsed_nodes({"trace_text": "A -r-> B"}) == ["A", "B"]
    assert F.parsed_nodes({"trace_text": None}) == []
    assert F.parsed_nodes({"trace_entities": ["A", "C"]}) == ["A", "C"]


# --- stop rule -----------------------------------------------------------------------------------


def test_answer_end_waits_for_the_answer_lines_newline():
    assert F.answer_end("TRACE: x\nANSWER: D and more\nx") == len("TRACE: x\nANSWER: D and more")
    assert F.answer_end("TRACE: x\nANSWER: D") is None  # the line may go on
    assert F.answer_end("ANSWER: B\nTRACE: x\n") is None  # the reward reads an ANSWER line after TRACE


def test_cut_after_answer():
    assert F.cut_after_answer("TRACE: x\nANSWER: D\njunk") == "TRACE: x\nANSWER: D"
    assert F.cut_after_answer("TRACE: x\nANSWER: D") == "TRACE: x\nANSWER: D"
    assert F.cut_after_answer("TRACE: x\nno answer") == "TRACE: x\nno answer"


# --- chat template -------------------------------------------------------------------------------


def test_encode_text_adds_bos_only_when_missing():
    class Tok:
        bos_token, bos_token_id = "<s>", 1

        def encode(self, text, add_special_tokens=True):
            body = [ord(c) for c in text.replace("<s>", "\x01")]
            return ([1] if add_special_tokens else []) + body

    assert F.encode_text(Tok(), "ab") == [1, 97, 98]
    assert F.encode_text(Tok(), "<s>ab") == [1, 97, 98]


def test_chat_prompt_passes_system_and_user_messages():
    class Tok:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"

    assert F.chat_prompt(Tok(), "Q?") == f"system:{F.SYSTEM_PROMPT}|user:Q?|assistant:"
    assert F.chat_prompt(Tok(), "Q?", system="S") == "system:S|user:Q?|assistant:"


def test_shared_prefix_len_leaves_every_prompt_a_token():
    a, b = list(range(20)), list(range(12)) + [99]
    assert F.shared_prefix_len([a, b]) == 12
    assert F.shared_prefix_len([a, a]) == 19  # one token of each left to prefill
    assert F.shared_prefix_len([a, [0, 1, 2, 7]]) == 0  # shorter than min_len
    assert F.shared_prefix_len([a, [0, 1, 2, 7]], min_len=3) == 3


def test_format_imports_no_mlx():
    code = "import sys, tracer.format, tracer.reward, tracer.metrics, tracer.dataset; print('mlx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_frontier_trace_lists_each_hops_entities_in_the_order_first_reached():
    edges = {("S", "r"): ["B", "A"], ("A", "s"): ["T", "X"], ("B", "s"): ["T", "C"]}
    trace = F.frontier_trace("S", ["r", "s"], lambda x, rel: edges.get((x, rel), []), "C")
    # A's targets first (A sorts before B), each member's sorted, T only once
    assert trace == "TRACE: S -r-> {A, B} -s-> {T, X, C}\nANSWER: C"
    nodes, rels = F.trace_steps(trace.split("\n")[0].removeprefix("TRACE: "))
    assert [F.node_names(n) for n in nodes] == [["S"], ["A", "B"], ["T", "X", "C"]] and rels == ["r", "s"]
    assert F.node_names("{}") == [] and F.node_names("{ A, `B`, }") == ["A", "B"] and F.node_names("{A") == ["{A"]
    assert F.node_names("{Smith,John, B}") == ["Smith,John", "B"]  # an id may hold a comma, not a space
    assert F.with_answer(trace, "A") == "TRACE: S -r-> {A, B} -s-> {T, X, C}\nANSWER: A"


# --- letter tags (data.option_tags) --------------------------------------------------------------


def test_tagged_prompts_and_traces_write_the_letter_after_the_entity():
    opts = {"A": "X1", "B": "X2", "C": "X3", "D": "X4"}
    p = F.build_prompt("Which?", opts, tags=True)
    assert p == F.build_prompt("Which?", opts).replace("A) X1\nB) X2\nC) X3\nD) X4", "X1 (A)\nX2 (B)\nX3 (C)\nX4 (D)")
    edges = [("E0", "a", "E1"), ("E1", "b", "E2")]
    text = F.reference_trace(["E0", "E1", "E2"], edges, "C", tags=True)
    assert text == "TRACE: E0 -a-> E1 -b-> E2 (C)\nANSWER: C"
    assert F.with_answer(text, "A") == "TRACE: E0 -a-> E1 -b-> E2 (A)\nANSWER: A"
    edges = {("S", "r"): ["B", "A"], ("A", "s"): ["T", "X"], ("B", "s"): ["T", "C"]}
    trace = F.frontier_trace("S", ["r", "s"], lambda x, rel: edges.get((x, rel), []), "D", answer="X")
    assert trace == "TRACE: S -r-> {A, B} -s-> {T, X (D), C}\nANSWER: D"
    assert F.with_answer(trace, "B") == "TRACE: S -r-> {A, B} -s-> {T, X (B), C}\nANSWER: B"


@pytest.mark.parametrize("completion, nodes", [
    ("TRACE: E0 -a-> E1 -b-> E2 (C)\nANSWER: C", ["E0", "E1", "E2"]),
    ("TRACE: E0 -a-> {E1 (B), E2}\nANSWER: B", ["E0", "{E1, E2}"]),
    ("TRACE: E0 -a-> E1 (B) -b-> E2\nANSWER: B", ["E0", "E1", "E2"]),
    ("TRACE: E0 (A)-> E1 (B) -> E2\nANSWER: B", ["E0", "E1", "E2"]),  # bare arrows
    ("TRACE: E0 -a-> `E2 (C)`.\nANSWER: C", ["E0", "E2"]),  # what a node is trimmed of may follow
    # not a tag: not at a node's end, no space before it, or not one letter A-D
    ("TRACE: E0 -a-> E1 -b-> E2 (C) trailing\nANSWER: C", ["E0", "E1", "E2 (C) trailing"]),
    ("TRACE: E0 -a-> Vitamin(A)\nANSWER: C", ["E0", "Vitamin(A)"]),
    ("TRACE: E0 -a-> E2 (E)\nANSWER: C", ["E0", "E2 (E)"]),
])
def test_a_trace_is_read_without_its_letter_tags(completion, nodes):
    p = F.parse_completion(completion, M)
    assert p.valid_format and F.trace_nodes(p.trace_text) == nodes


def test_with_answer_changes_only_tags():
    assert F.with_answer("TRACE: E0 -a-> Vitamin(A)\nANSWER: A", "C") == "TRACE: E0 -a-> Vitamin(A)\nANSWER: C"
    assert F.with_answer("TRACE: E0 -a-> E2 (A)\nANSWER: A.", "C") == "TRACE: E0 -a-> E2 (C)\nANSWER: C"
