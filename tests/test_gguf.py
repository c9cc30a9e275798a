"""GGUF → mlx-lm conversion (tracer.gguf): the q/k row permutation, and a tiny llama written as a
GGUF file converts back to the same model (logits, tokenizer, chat template)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tracer import gguf
from tracer.errors import TracerError

from tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_model  # tests/tiny_model.py

TEXTS = ["TRACE: E0 -caused_by-> E1 -fixed_by-> E2\nANSWER: C", "Which entity causes DiskFull? 12345"] * 8
GGUF_NAMES = {hf: name for name, hf in gguf._TENSOR_NAMES.items()}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_heads,head_dim,cols", [(9, 64, 576), (3, 64, 576), (4, 8, 5), (1, 2, 3)])
def test_unpermute_inverts_llama_cpp_permute(n_heads, head_dim, cols):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_heads * head_dim, cols)).astype(np.float32)
    permuted = _llama_cpp_permute(w, n_heads)
    assert np.array_equal(np.array(gguf.permute(mx.array(w), n_heads)), permuted)
    assert np.array_equal(np.array(gguf.unpermute(mx.array(permuted), n_heads)), w)
    assert np.array_equal(np.array(gguf.permute(gguf.unpermute(mx.array(w), n_heads), n_heads)), w)
    if head_dim > 2:
        assert not np.array_equal(permuted, w)


def test_unpermute_interleaved_to_half_split():
    # one head, head_dim 4: GGUF rows are (x0, y0, x1, y1) → HF rows (x0, x1, y0, y1)
    w = mx.array([[0.0], [1.0], [2.0], [3.0]])
    assert np.array(gguf.unpermute(w, 1)).ravel().tolist() == [0.0, 2.0, 1.0, 3.0]


def write_gguf(model_dir: Path, path: Path) -> None:
    """The tiny llama of ``model_dir`` as a float32 llama GGUF file, q/k rows in llama.cpp's order."""
    cfg = json.loads((model_dir / "config.json").read_text())
    tensors = {}
    for key, w in mx.load(str(model_dir / "model.safetensors")).items():
        name = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
                "lm_head.weight": "output"}.get(key)
        if name is None:  # model.layers.<i>.<part>.weight
            _, _, i, part = key.rsplit(".", 1)[0].split(".", 3)
            name = f"blk.{i}.{GGUF_NAMES[part]}"
            if part in ("self_attn.q_proj", "self_attn.k_proj"):
                w = gguf.permute(w, cfg["num_attention_heads" if part.endswith("q_proj") else "num_key_value_heads"])
        tensors[name + ".weight"] = w
    bpe = json.loads((model_dir / "tokenizer.json").read_text())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)

    def u32(v):
        return mx.array(v, dtype=mx.uint32)

    meta = {
        "general.architecture": "llama", "llama.block_count": u32(cfg["num_hidden_layers"]),
        "llama.embedding_length": u32(cfg["hidden_size"]), "llama.feed_forward_length": u32(cfg["intermediate_size"]),
        "llama.attention.head_count": u32(cfg["num_attention_heads"]),
        "llama.attention.head_count_kv": u32(cfg["num_key_value_heads"]),
        "llama.context_length": u32(cfg["max_position_embeddings"]),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]],
        "tokenizer.ggml.token_type": mx.array([3 if t in SPECIAL_TOKENS else 1 for t in tokens], dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(bpe["vocab"]["<|im_start|>"]),
        "tokenizer.ggml.eos_token_id": u32(bpe["vocab"]["<|im_end|>"]),
        "tokenizer.ggml.padding_token_id": u32(bpe["vocab"]["<|endoftext|>"]),
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    mx.save_gguf(str(path), tensors, meta)


@pytest.mark.parametrize("tie", [True, False])
def test_a_tiny_llama_converts_back_to_the_same_model(tmp_path, tie):
    from tracer import model as models

    src = build_tiny_model(tmp_path / "src", TEXTS, vocab_size=300, hidden=64, layers=2, heads=4, kv_heads=2,
                           intermediate=128, tie=tie)
    write_gguf(src, tmp_path / "tiny.gguf")
    out = gguf.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", hf_id="org/tiny")
    config = json.loads((out / "config.json").read_text())
    assert config["source"] == {"gguf": "tiny.gguf", "hf_id": "org/tiny"} and config["tie_word_embeddings"] == tie
    a, tok_a = models.load(str(src))
    b, tok_b = models.load(str(out))
    text = TEXTS[0] + " 678"
    ids = tok_a.encode(text, add_special_tokens=False)
    assert tok_b.encode(text, add_special_tokens=False) == ids
    assert np.allclose(np.array(a(mx.array([ids]))), np.array(b(mx.array([ids]))), atol=1e-5)
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    assert tok_b.apply_chat_template(chat, tokenize=False) == tok_a.apply_chat_template(chat, tokenize=False)
    assert tok_b.eos_token_id == tok_a.eos_token_id


def test_unreadable_or_unsupported_gguf_is_one_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(TracerError, match="cannot read GGUF file"):
        gguf.convert_gguf(bad, tmp_path / "out")
    other = tmp_path / "other.gguf"
    mx.save_gguf(str(other), {"token_embd.weight": mx.zeros((4, 2))}, {"general.architecture": "gpt2"})
    with pytest.raises(TracerError, match="unsupported GGUF architecture 'gpt2'"):
        gguf.convert_gguf(other, tmp_path / "out")
