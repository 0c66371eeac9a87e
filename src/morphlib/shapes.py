"""Architectures of well-known models and their weight bytes, as plain arithmetic (no torch, no download).

``SHAPES`` holds the public configs of the models the book times with random ("dummy") weights;
``shape_layer_bytes(shape, group_size)`` gives one decoder layer's 16-bit and INT4 bytes, and
``int4_nbytes`` the bytes of one packed INT4 matrix (4 bits per weight plus a bf16 scale and zero per
group) — the exact accounting the serving engine turns into KV blocks.
"""

from __future__ import annotations

from morphlib.errors import MorphError

SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           rope_theta=10000.0, max_position_embeddings=2048),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       rope_theta=10000.0, max_position_embeddings=4096),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       rope_theta=500000.0, max_position_embeddings=8192),
}


def shape_config(shape: str) -> dict:
    """The config dict of a built-in shape; a one-line error naming the choices otherwise."""
    if shape not in SHAPES:
        raise MorphError(f"unknown model shape {shape!r}: choose one of {', '.join(SHAPES)}")
    return SHAPES[shape]


def int4_nbytes(n: int, k: int, group_size: int) -> int:
    """Bytes of a packed [N, K] INT4 weight with bf16 (scale, zero) per group."""
    return n * k // 2 + (k // group_size) * n * 2 * 2


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(N, K) of the seven projections of one Llama-style decoder layer."""
    h, i = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def shape_layer_bytes(shape: str, group_size: int = 64) -> dict:
    """FP16 and INT4 bytes of one decoder layer of a built-in shape, without building it."""
    mats = linear_shapes(shape_config(shape)).values()
    fp16 = sum(n * k * 2 for n, k in mats)
    int4 = sum(int4_nbytes(n, k, group_size) for n, k in mats)
    return {"shape": shape, "fp16_bytes": fp16, "int4_bytes": int4, "ratio": int4 / fp16}
