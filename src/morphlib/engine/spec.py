"""The architecture the engine runs: Llama-family decoders (LlamaForCausalLM), read from an HF config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from morphlib.errors import MorphError
from morphlib.shapes import linear_shapes

SUPPORTED = ("llama",)


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    tied: bool
    max_positions: int
    name: str = "model"

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(N, K) of the seven projections, in the order they sit in a layer's region."""
        return linear_shapes({"hidden_size": self.hidden, "intermediate_size": self.intermediate,
                              "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                              "head_dim": self.head_dim})

    def with_layers(self, n: int) -> "ModelSpec":
        return ModelSpec(self.hidden, self.intermediate, n, self.num_heads, self.num_kv_heads, self.head_dim,
                         self.vocab, self.eps, self.tied, self.max_positions, self.name)

    @classmethod
    def from_hf_config(cls, cfg, name: str = "model") -> "ModelSpec":
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        mtype = get("model_type", "llama" if isinstance(cfg, dict) else None)
        arch = ",".join(get("architectures", None) or []) or mtype
        if mtype not in SUPPORTED:
            raise MorphError(f"the engine cannot run {name!r}: model type {mtype!r} ({arch}); it runs Llama-family "
                             "decoders (LlamaForCausalLM)")
        problems = []
        if get("hidden_act", "silu") != "silu":
            problems.append(f"activation {get('hidden_act')!r}")
        if get("attention_bias", False) or get("mlp_bias", False):
            problems.append("linear biases")
        scaling = get("rope_scaling", None)
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in (None, "default", "llama3"):
            problems.append(f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r}")
        if problems:
            raise MorphError(f"the engine cannot run {name!r}: {', '.join(problems)} (it runs plain Llama decoders)")
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        return cls(hidden=hidden, intermediate=get("intermediate_size"), num_layers=get("num_hidden_layers"),
                   num_heads=heads, num_kv_heads=get("num_key_value_heads", None) or heads,
                   head_dim=get("head_dim", None) or hidden // heads, vocab=get("vocab_size"),
                   eps=float(get("rms_norm_eps", 1e-5) or 1e-5), tied=bool(get("tie_word_embeddings", False)),
                   max_positions=int(get("max_position_embeddings", 2048) or 2048), name=name)


def spec_of(hf_config, name: str, module=None) -> ModelSpec:
    """The spec of an HF config; with the module, tied or not as its weights really are (a config can say
    tied when it is not)."""
    spec = ModelSpec.from_hf_config(hf_config, name)
    if module is not None:
        tied = module.get_output_embeddings().weight.data_ptr() == module.get_input_embeddings().weight.data_ptr()
        spec = dataclasses.replace(spec, tied=tied)
    return spec
