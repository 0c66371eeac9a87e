"""GemLite (PyPI ``gemlite``, Apache-2.0: Triton A16W4 kernels with configs shipped per card) as a column
of the INT4 kernels benchmark: what a user would pick instead of our kernels, measured in the same run.

* **Where.** ``$MORPHLIB_GEMLITE`` (a folder holding the ``gemlite`` package, e.g. its unpacked sdist),
  else ``<repository>/.gemlite/gemlite-<VERSION>/`` (git-ignored; fetched with
  ``pip download --no-deps --no-binary :all: gemlite==<VERSION> -d .gemlite`` and unpacked there), else
  the sdist ``.gemlite/gemlite-<VERSION>.tar.gz`` alone, unpacked once into the temporary folder (a
  178 KB carry to a GPU machine), else an installed ``gemlite``. Absent, or without a GPU: the column
  says why, and the benchmark runs on.
* **Configs, no autotuning.** The shipped ``configs/<CONFIG>.json`` (H100) is loaded explicitly with
  ``GemLiteLinear.load_config`` (an H200's name matches none of GemLite's tags). A signature it lacks
  (rows bucket, N, K for the kernel GemLite picks at that row count) borrows the shipped entry of the
  same kernel and format nearest in log2 distance over (rows, N, K); every row records which. So a run
  never autotunes (that costs seconds per shape and row count) and its dispatch is deterministic.
* **Format.** GemLite follows HQQ, W ~ (W_q - zeros) * scales, per group of ``g`` along K; ours is
  W = (q - 8) * scale + zero (``quant.int4``). The same q and bf16 scale give zeros = 8 - zero / scale
  (bf16); GemLite then stores -zeros * scales as its additive term (``fma_mode``). ``hqq_weights`` makes
  them, ``hqq_dequantize`` is GemLite's arithmetic on them in torch (the CPU check of the conversion).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

VERSION = "0.6.0.post2"
ENV = "MORPHLIB_GEMLITE"
CONFIG = "h100"  # the shipped config an H100/H200 run loads
FOLDER = Path(__file__).resolve().parents[3] / ".gemlite"
_STATE: dict = {}  # the imported module and where it came from, once per process


def source_folder() -> Path | None:
    """The folder that holds the ``gemlite`` package to import (``ENV``, else the repository's unpacked sdist,
    else its sdist unpacked once into the temporary folder), or None."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    folder = FOLDER / f"gemlite-{VERSION}"
    if (folder / "gemlite" / "__init__.py").is_file():
        return folder
    sdist = FOLDER / f"gemlite-{VERSION}.tar.gz"
    return _unpacked(sdist) if sdist.is_file() else None


def _unpacked(sdist: Path) -> Path:
    """``sdist`` unpacked under the temporary folder (once; concurrent processes race harmlessly: the first
    complete copy is renamed into place, the others are dropped)."""
    import shutil
    import tarfile
    import tempfile

    dest = Path(tempfile.gettempdir()) / f"morphlib-gemlite-{VERSION}"
    if not (dest / f"gemlite-{VERSION}" / "gemlite" / "__init__.py").is_file():
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + "."))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        try:
            os.rename(tmp, dest)
        except OSError:  # another process put its copy there first
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / f"gemlite-{VERSION}"


def load():
    """(the ``gemlite`` module, "where it came from") or (None, "why not"), once per process."""
    if "module" in _STATE:
        return _STATE["module"], _STATE["info"]
    module, info = None, None
    folder = source_folder()
    if not torch.cuda.is_available():
        info = "not run: GemLite's kernels (and its import) need a CUDA GPU"
    elif folder is not None and not (folder / "gemlite" / "__init__.py").is_file():
        info = f"not installed: {ENV}={folder} holds no gemlite package"
    else:
        if folder is not None and str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        try:
            import gemlite as module
        except ImportError as exc:
            info = f"not installed ({str(exc).splitlines()[0][:100]})"
        except Exception as exc:  # noqa: BLE001  (its import touches the GPU and Triton: a column, not the run)
            info = f"failed to import: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        else:
            info = f"gemlite {module.__version__} from {Path(module.__file__).parent.parent}"
    _STATE.update(module=module if info.startswith("gemlite ") else None, info=info)
    return _STATE["module"], info


def hqq_weights(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """Our INT4 weight (q uint8 [N, K]; scale and zero [N, K/g], rounded to bf16 as the library stores them)
    in GemLite's HQQ convention: (W_q uint8 [N, K], scales bf16 [N, K/g], zeros bf16 [N, K/g])."""
    s, z = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
    zeros = (8.0 - z.float() / s.float()).to(torch.bfloat16)
    return q.to(torch.uint8).contiguous(), s.contiguous(), zeros.contiguous()


def hqq_dequantize(w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """GemLite's weight from HQQ tensors in fma mode (its ``W_group_mode`` 4: W_q * s + bf16(-zeros * s)), fp32."""
    n, k = w_q.shape
    shift = (-zeros.float() * scales.float()).to(scales.dtype).float()
    wg = w_q.float().view(n, k // group_size, group_size)
    return (wg * scales.float()[..., None] + shift[..., None]).view(n, k)


def _signature(m_bucket: int, n: int, k: int, g: int) -> str:
    return str((m_bucket, n, k, g, 32 // 4, 1 * 100 + 4))  # 4-bit packed in int32; bf16 shares fp16's type id (1)


def configure(gl, shapes, rows, group_size: int) -> dict:
    """Load the shipped config and add, for every (N, K) of ``shapes`` and row count of ``rows``, the
    nearest shipped entry where the signature is missing. Returns {(n, k, m): "shipped" | "from <sig>"}."""
    from gemlite import core  # importable once load() has put its folder on sys.path
    from gemlite.triton_kernels.utils import get_closest_m

    path = Path(gl.__file__).parent / "configs" / f"{CONFIG}.json"
    gl.GemLiteLinear.reset_config()
    if not gl.GemLiteLinear.load_config(str(path)):
        raise RuntimeError(f"GemLite could not load {path}")
    cache = core.GEMLITE_TRITON_CONFIG_CACHE
    shipped = json.loads(path.read_text())
    used = {}
    for n, k in shapes:
        for m in rows:
            kind = core.get_matmul_type(m, 4)
            sig = _signature(get_closest_m(m), n, k, group_size)
            entries = cache.setdefault(kind, {})
            if sig in shipped.get(kind, {}):
                used[(n, k, m)] = "shipped"
                continue
            near = _nearest(sig, shipped.get(kind, {}))
            if near is None:
                used[(n, k, m)] = f"no shipped {kind} entry for this format: GemLite autotunes"
                continue
            entries[sig] = dict(shipped[kind][near])
            used[(n, k, m)] = f"from {near}"
    return used


def _nearest(sig: str, entries: dict) -> str | None:
    """The entry of ``entries`` with the same group, packing and type as ``sig``, nearest in log2 (M, N, K)."""
    want = parse_signature(sig)
    best = None
    for key in entries:
        have = parse_signature(key)
        if have[3:] != want[3:]:
            continue
        d = sum(abs(math.log2(a) - math.log2(b)) for a, b in zip(have[:3], want[:3]))
        if best is None or (d, key) < best:
            best = (d, key)
    return None if best is None else best[1]


def parse_signature(text: str) -> tuple[int, ...]:
    """'(1, 4096, 4096, 64, 8, 104)' -> the tuple of ints (GemLite's signature keys: rows bucket, N, K, group,
    values per packed word, type id)."""
    return tuple(int(x) for x in text.strip("() ").split(","))


def linear_args(gl, q, scale, zero, group_size: int, device):
    """(tensor args, meta args) of GemLite's functional forward for our weight, packed on ``device``."""
    n, k = q.shape
    w_q, scales, zeros = hqq_weights(q, scale, zero)
    lin = gl.GemLiteLinear(4, group_size=group_size, in_features=k, out_features=n,
                           input_dtype=gl.DType.BF16, output_dtype=gl.DType.BF16)
    lin.pack(w_q.to(device), scales.to(device), zeros.to(device), None)
    return lin.get_tensor_args(), lin.get_meta_args()


def forward(gl, x: torch.Tensor, tensor_args, meta_args) -> torch.Tensor:
    return gl.forward_functional(x, None, tensor_args, meta_args)


def warm(jobs, group_size: int) -> list[str]:
    """Compile GemLite's kernels for ``jobs`` [(n, k, rows)] (fills Triton's on-disk cache: the kernels
    benchmark runs this in its parallel precompile workers). Returns error lines."""
    gl, info = load()
    if gl is None:
        return [f"GemLite {info}"]
    shapes = sorted({(n, k) for n, k, _ in jobs})
    configure(gl, shapes, sorted({m for *_, m in jobs}), group_size)
    errors = []
    for n, k in shapes:
        gen = torch.Generator().manual_seed(n + k)
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        scale = torch.rand(n, k // group_size, generator=gen) * 1e-2 + 1e-3
        args = linear_args(gl, q, scale, torch.zeros_like(scale), group_size, "cuda")
        for m in sorted(m for a, b, m in jobs if (a, b) == (n, k)):
            try:
                forward(gl, torch.randn(m, k, device="cuda").to(torch.bfloat16), *args)
            except Exception as exc:  # noqa: BLE001  (reported; the timed run says the same per row)
                errors.append(f"GemLite {n}x{k} rows {m}: {type(exc).__name__}: {str(exc)[:160]}")
    torch.cuda.synchronize()
    return errors
