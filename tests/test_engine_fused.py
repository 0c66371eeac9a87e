"""The engine's fused INT4 projections (CPU, seconds): q/k/v quantized as one ``qkv`` matrix and gate/up
as one ``gate_up`` hold exactly the rows of the projections quantized apart (codes, packed bytes and
scale/zero pairs bitwise), the head does not grow, an all-INT4 engine's greedy tokens and logits equal
the separate-projection computation bitwise, and a step launches 4 INT4 matmuls per layer (7 with AWQ
scales, which q/k/v do not share)."""

import pytest
import torch

from morphlib.engine import LLM, EngineConfig, SamplingParams
from morphlib.engine import model as model_mod
from morphlib.engine.loader import linear_weight, quantize_layer
from morphlib.engine.memory import FUSED, LINEARS, Layout, align
from morphlib.engine.spec import ModelSpec
from morphlib.quant.int4 import Int4Linear, choose_layout, int4_matmul, pack, packed_specs, unpack
from morphlib.shapes import SHAPES

# TINY: every matrix in the CPU kernel's layout (N % 64 == 0); ODD (group 32): qkv (160 rows) and k/v (16)
# in the plain layout but q (128) in the CPU kernel's, gate_up (320) in the CPU kernel's but gate and up (160)
# in the plain one
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False)
ODD = dict(TINY, intermediate_size=160, num_attention_heads=8, num_key_value_heads=1)
PROMPTS = [list(range(3, 3 + n)) for n in (5, 17, 33)]
NEW = 12


def tiny_model(cfg: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def all_int4_engine(hf, **kw) -> LLM:
    llm = LLM(hf, EngineConfig(max_num_seqs=4, max_num_batched_tokens=128, max_model_len=128, **kw))
    llm.swap(list(range(llm.spec.num_layers)), wait=True)
    assert llm.int4_layers == list(range(llm.spec.num_layers))
    return llm


def separate_twins(hf, layout: Layout) -> dict:
    """{(layer, projection): Int4Linear}: each projection quantized on its own, what the engine did before
    its INT4 matrices were fused (``Int4Linear.from_weight`` on its 16-bit weight, this device's layout)."""
    out = {}
    for li, layer in enumerate(hf.model.layers):
        mods = {**{n: getattr(layer.self_attn, n) for n in LINEARS[:4]}, **{n: getattr(layer.mlp, n) for n in LINEARS[4:]}}
        for name, mod in mods.items():
            out[li, name] = Int4Linear.from_weight(mod.weight.detach().to(layout.dtype), group_size=layout.group_size)
    return out


def separate_int4(twins: dict, layout: Layout):
    """A drop-in ``Model._int4``: one INT4 matmul per projection over the separate twins, outputs concatenated."""
    def _int4(self, x, layer, matrix):
        ys = [int4_matmul(x.to(torch.bfloat16), t.packed, t.scale_zero, n=t.out_features, k=t.in_features,
                          group_size=t.group_size, layout=t.layout, mode="fast").to(x.dtype)
              for t in (twins[layer, name] for name in FUSED[matrix])]
        return torch.cat(ys, dim=-1)
    return _int4


def greedy(llm):
    logits = []

    def keep(seqs, rows, tokens):
        logits.append(rows.clone())
        return tokens
    llm.runner.on_logits = keep
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW, ignore_eos=True))
    llm.runner.on_logits = None
    return [o.token_ids for o in outs], logits


@pytest.mark.parametrize("cfg,group", [(TINY, 64), (ODD, 32)], ids=["cpu-layout", "mixed-layouts"])
def test_fused_matrices_hold_the_separate_projections_rows(cfg, group):
    hf = tiny_model(cfg)
    llm = LLM(hf, EngineConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64, swappable=(),
                               group_size=group))
    lay = llm.layout
    assert lay.int4_members == FUSED and set(lay.int4) == {"qkv", "o", "gate_up", "down"}
    twins = quantize_layer(llm.arena, lay, 1, symmetric=False)
    for name, members in FUSED.items():
        n, k = lay.int4_shapes[name]
        codes = unpack(twins[name]["packed"], lay.int4_layouts[name], n, k)
        alone = [Int4Linear.from_weight(linear_weight(llm.arena, lay, 1, m), group_size=lay.group_size) for m in members]
        want = torch.cat([unpack(t.packed, t.layout, t.out_features, k) for t in alone])
        assert torch.equal(codes, want), name
        assert torch.equal(twins[name]["packed"], pack(want, lay.int4_layouts[name])), name
        assert torch.equal(twins[name]["scale_zero"], torch.cat([t.scale_zero for t in alone], dim=1)), name
        x = torch.randn(7, k).to(torch.bfloat16)
        fused = int4_matmul(x, twins[name]["packed"], twins[name]["scale_zero"], n=n, k=k,
                            group_size=lay.group_size, layout=lay.int4_layouts[name], mode="fast")
        separate = torch.cat([t(x) for t in alone], dim=-1)
        if all(t.layout == lay.int4_layouts[name] for t in alone):  # the same kernel: bitwise
            assert torch.equal(fused, separate), name
        else:  # another layout's kernel (the CPU one vs dequantize + GEMM): its documented tolerance
            assert (fused.float() - separate.float()).norm() <= 1e-2 * separate.float().norm(), name


def _separate_head_bytes(lay: Layout) -> int:
    """The INT4 head when each projection had its own packed and scale_zero pieces (the layout before fusion)."""
    total = 0
    for name in LINEARS:
        n, k = lay.shapes[name]
        for shape, dt in packed_specs(n, k, lay.group_size, choose_layout(n, k, lay.device)).values():
            total = align(total + torch.empty(shape, dtype=dt).nbytes)
    return total


@pytest.mark.parametrize("shape", ["smollm2-135m", "llama-2-7b"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fused_head_is_no_larger_and_frees_as_many_blocks(shape, device):
    # a Layout is arithmetic: the CUDA one (triton layout) is computed here without a GPU
    spec = ModelSpec.from_hf_config(dict(SHAPES[shape], model_type="llama"), shape)
    lay = Layout(spec, torch.bfloat16, torch.device(device), 16, 64, False, 2, 4096)
    before = _separate_head_bytes(lay)
    assert lay.head_bytes <= before
    assert lay.tail_blocks >= (lay.region_bytes - align(before)) // lay.block_bytes
    assert sum(p.nbytes for pieces in lay.int4.values() for p in pieces.values()) == \
        sum(n * k // 2 + (k // 64) * n * 4 for n, k in lay.shapes.values())


def test_all_int4_engine_equals_the_separate_projections():
    hf = tiny_model(TINY)
    llm = all_int4_engine(hf)
    got, got_logits = greedy(llm)
    ref = LLM(hf, EngineConfig(max_num_seqs=4, max_num_batched_tokens=128, max_model_len=128))
    ref.swap(list(range(ref.spec.num_layers)), wait=True)
    twins = separate_twins(hf, ref.layout)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_mod.Model, "_int4", separate_int4(twins, ref.layout))
        want, want_logits = greedy(ref)
    assert got == want
    assert len(got_logits) == len(want_logits) and all(torch.equal(a, b) for a, b in zip(got_logits, want_logits))
    # the 16-bit engine gives other tokens: the comparison sees INT4 numerics
    plain, _ = greedy(LLM(hf, EngineConfig(max_num_seqs=4, max_num_batched_tokens=128, max_model_len=128)))
    assert plain != got


def _launches_per_layer_forward(llm, monkeypatch) -> float:
    calls = []
    real = model_mod.int4_matmul
    monkeypatch.setattr(model_mod, "int4_matmul", lambda *a, **kw: calls.append(kw["n"]) or real(*a, **kw))
    first = len(llm.steps)
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=3, ignore_eos=True))
    forwards = sum(r.path != "idle" for r in llm.steps[first:])
    monkeypatch.setattr(model_mod, "int4_matmul", real)
    return len(calls) / (forwards * llm.spec.num_layers), sorted(set(calls))


def test_an_int4_layer_launches_four_matmuls(monkeypatch):
    llm = all_int4_engine(tiny_model(TINY))
    per_layer, ns = _launches_per_layer_forward(llm, monkeypatch)
    s = llm.spec
    assert per_layer == 4
    assert ns == sorted({s.q_dim + 2 * s.kv_dim, s.hidden, 2 * s.intermediate})


def test_awq_scales_keep_projections_apart(monkeypatch):
    """AWQ scales are per projection (``morphlib.awq``): q/k/v cannot share one input scale, so each stays its
    own INT4 matrix with its ``input_scale_inv`` (7 launches), and the engine still equals the Morpher in HF."""
    from morphlib.morph import Morpher, QuantConfig

    hf = tiny_model(TINY)
    gen = torch.Generator().manual_seed(0)
    k = {n: TINY["intermediate_size"] if n == "down_proj" else TINY["hidden_size"] for n in LINEARS}
    scales = {li: {("mlp." if n in LINEARS[4:] else "self_attn.") + n: torch.rand(k[n], generator=gen) + 0.5
                   for n in LINEARS} for li in range(TINY["num_hidden_layers"])}
    morpher = Morpher(hf, QuantConfig(group_size=64), scales=scales, progress=False)
    llm = LLM(hf, EngineConfig(max_num_seqs=4, max_num_batched_tokens=128, max_model_len=128), int4=morpher)
    llm.swap(list(range(TINY["num_hidden_layers"])), wait=True)
    lay = llm.layout
    assert lay.awq and set(lay.int4) == set(LINEARS) and lay.int4_of == FUSED
    assert all("input_scale_inv" in pieces for pieces in lay.int4.values())
    per_layer, _ = _launches_per_layer_forward(llm, monkeypatch)
    assert per_layer == 7
    x = torch.randn(5, TINY["hidden_size"])
    morpher.swap(list(range(TINY["num_hidden_layers"])))
    try:
        attn = hf.model.layers[1].self_attn
        want = torch.cat([getattr(attn, n)(x.to(torch.bfloat16)).float() for n in LINEARS[:3]], dim=-1)
    finally:
        morpher.restore()
    assert torch.equal(llm.model._int4(x, 1, "qkv"), want)


@pytest.mark.gpu
def test_gpu_fused_all_int4_step_matches_the_separate_projections(monkeypatch):
    """CUDA (Triton kernels, whose plan depends on N: not bitwise): an all-INT4 SmolLM2-shaped engine's
    logits on teacher-forced prefill and decode steps (1 and 4 rows) vs the same steps over the projections
    quantized apart, 4 launches per layer; each fused output within the kernels' tolerance of the separate ones."""
    llm = LLM("shape:smollm2-135m", EngineConfig(memory_budget=2 << 30, max_num_seqs=4, max_model_len=256,
                                                 enforce_budget=False, cuda_graphs=False))
    lay, n_layers = llm.layout, llm.spec.num_layers
    twins = {(li, name): Int4Linear.from_weight(linear_weight(llm.arena, lay, li, name).clone(), group_size=lay.group_size)
             for li in range(n_layers) for name in LINEARS}
    llm.swap(list(range(n_layers)), wait=True)
    for matrix, k in (("qkv", llm.spec.hidden), ("o", llm.spec.q_dim), ("gate_up", llm.spec.hidden),
                      ("down", llm.spec.intermediate)):
        x = torch.randn(5, k, device="cuda", dtype=torch.bfloat16)
        got = llm.model._int4(x, 3, matrix)
        want = separate_int4(twins, lay)(llm.model, x, 3, matrix)
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2, matrix

    def forced(prompts):
        logits = []

        def keep(seqs, rows, tokens):
            logits.append(rows.float().cpu())
            return [7] * len(tokens)  # the same next tokens in both runs
        llm.runner.on_logits = keep
        llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
        llm.runner.on_logits = None
        return torch.cat(logits)

    prompts = [list(range(10, 10 + n)) for n in (5, 17, 33, 64)]
    per_layer, _ = _launches_per_layer_forward(llm, monkeypatch)
    assert per_layer == 4
    got = torch.cat([forced(prompts[:1]), forced(prompts)])
    with monkeypatch.context() as mp:
        mp.setattr(model_mod.Model, "_int4", separate_int4(twins, lay))
        want = torch.cat([forced(prompts[:1]), forced(prompts)])
    assert got.shape == want.shape == (20, llm.spec.vocab)
    # 30 layers of bf16 rounding in two kernel plans; a wrong row split or scale gives O(1) (a bound, not measured)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 5e-2, rel


def test_tune_missing_lists_only_the_fused_shapes_and_merge_keeps_the_old_entries():
    """``bench --tune-missing`` after the fusion: the H200 table as it was lacked exactly the engine's qkv and
    gate_up matrices of each model; merging a new record adds them and keeps every tuned entry."""
    from morphlib.bench import kernels as qb
    from morphlib.errors import MorphError
    from morphlib.quant import int4

    shipped = int4.tuning_table()["devices"]["NVIDIA H200"]
    assert qb.missing_shapes(shipped) == []  # tuned since the fusion
    fused = {int4.shape_key(s["n"], s["k"], 64) for s in qb.model_shapes(fused=True)
             if set(s["linears"]) & {"qkv", "gate_up"}}
    old = {**shipped, "entries": {k: v for k, v in shipped["entries"].items() if k not in fused}}  # before it
    missing = qb.missing_shapes(old)
    assert {name for s in missing for name in s["linears"]} == {"qkv", "gate_up"}
    assert len(missing) == 2 * len(qb.MODELS)
    llama = SHAPES["llama-2-7b"]
    assert {"model": "llama-2-7b", "n": 3 * llama["hidden_size"], "k": llama["hidden_size"], "linears": ["qkv"]} in missing
    assert qb.missing_shapes({"entries": {**old["entries"], **{int4.shape_key(s["n"], s["k"], 64): {} for s in missing}}}) == []
    new = {"capability": [9, 0], "sm_count": 132, "made": {"date": "d"}, "entries": {"12288x4096/g64": {"1": {}}}}
    merged = qb.merge_record(old, new)
    assert merged["entries"] == {**old["entries"], "12288x4096/g64": {"1": {}}}
    assert merged["made"] == [*shipped["made"], {"date": "d"}]  # every run that made entries, in order
    assert qb.merge_record(None, new) is new
    with pytest.raises(MorphError):
        qb.merge_record(None, None)
