"""GGUF files to cached Hugging Face folders, with a tokenizer built from the GGUF's own vocabulary where needed.

``hf_folder(gguf)`` converts a GGUF once (dequantized float32 safetensors + tokenizer + config) into
``$MORPHLIB_CACHE/gguf/<key>/hf`` (the built-in models: a folder of their own) and returns that
folder; later loads take seconds instead of the 75-100 s that transformers needs to dequantize a
GGUF. The key is the file's resolved path, size and modification time, so an edited or replaced file
is converted again. The folder's ``.complete`` records the code that converted it and the versions of
``CONVERSION_DISTS`` (``morphlib.producer``): it is converted again when that code has changed or,
in the book's environment, a version has; a reuse adds that code to the running result's fingerprint.
An environment with vLLM installed (chapter 6's ``.venv-vllm``, with another transformers, whose GGUF
tokenizer writes other files) never converts: it reads the book environment's conversion whatever
versions made it, and says in one line to run ``bash scripts/setup.sh`` (which converts with the
pinned transformers) when there is none or its code has changed.

Tokenizers. transformers' GGUF tokenizer is used as is, except for the Gemma families, whose
SentencePiece *BPE* vocabulary transformers (5.17) rebuilds as a *Unigram* model: that tokenizer
over-segments English (``The capital of France is`` -> 10 pieces instead of 5) and the model's
perplexity on it is in the thousands. :func:`spm_bpe_tokenizer` builds the tokenizer the GGUF
describes instead, with the semantics of SentencePiece BPE as llama.cpp applies it to a GGUF:

* user-defined pieces (``\\n``, runs of spaces or tabs, HTML tags...) are matched first, longest first,
  in the raw text, and are never merged or split;
* every other stretch of text has its spaces replaced by ``▁`` (no dummy prefix when the GGUF's
  ``add_space_prefix`` is false) and is merged pairwise from single characters, always merging the
  adjacent pair whose concatenation is the highest-scoring normal piece (expressed as BPE merges:
  every split of a normal piece into two normal pieces, ranked by the piece's score);
* characters outside the vocabulary fall back to their UTF-8 byte pieces ``<0xNN>``;
* the GGUF's ``add_bos_token`` / ``add_eos_token`` decide what ``tokenizer(text)`` adds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from morphlib.assets import cache_dir
from morphlib.errors import MorphError
from morphlib.producer import producing, reuse, stale_reason

CONVERSION_DISTS = ("transformers", "tokenizers", "gguf", "torch")  # their versions are in every conversion's record
SPM_REBUILT_ARCHS = ("gemma", "gemma2", "gemma3", "gemma3_text")  # archs whose GGUF tokenizer transformers gets wrong
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # GGUF token types


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise MorphError(f"{path.name} is not a readable GGUF file: {str(exc).splitlines()[0]}") from None


def gguf_arch(path: Path) -> str:
    return str(_field(_reader(path), "general.architecture", "unknown"))


def spm_bpe_tokenizer(path: Path):
    """A transformers tokenizer for a GGUF whose ``tokenizer.ggml.model`` is ``llama`` (SentencePiece),
    built from its tokens, scores and token types (see the module doc for the exact rules)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    reader = _reader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "llama":
        raise MorphError(f"{path.name}: tokenizer model {kind!r} is not SentencePiece ('llama'); cannot rebuild it")
    if "tokenizer.ggml.merges" in reader.fields:
        raise MorphError(f"{path.name}: this SentencePiece GGUF carries explicit merges; not handled here")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    if not (len(tokens) == len(scores) == len(types)):
        raise MorphError(f"{path.name}: tokens, scores and token types differ in length")
    if _field(reader, "tokenizer.ggml.add_space_prefix", False):
        raise MorphError(f"{path.name}: SentencePiece with a dummy space prefix is not handled by morphlib's rebuild")

    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == _NORMAL}
    merges = []  # every split of a normal piece into two normal pieces, highest-scoring piece first
    for piece in sorted(normal, key=lambda t: (-scores[normal[t]], normal[t])):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((left, right))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise MorphError(f"{path.name}: the vocabulary holds duplicate pieces")

    def special(key):
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[int(idx)]

    unk = special("unknown")
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    # no normal piece holds an inner "▁", so splitting before each "▁" changes no result and lets words be cached
    if not any("▁" in t[1:] for t in normal):
        tk.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == _CONTROL and not t.startswith("<unused")])
    bos, eos = special("bos"), special("eos")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = " ".join(([f"{bos}"] if add_bos else []) + ["$A"] + ([f"{eos}"] if add_eos else []))
    pair = " ".join(([f"{bos}"] if add_bos else []) + ["$A", "$B"] + ([f"{eos}"] if add_eos else []))
    used = [(t, vocab[t]) for t, flag in ((bos, add_bos), (eos, add_eos)) if flag]
    tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=used)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=unk,
                                   pad_token=special("padding"))


def cache_key(path: Path) -> str:
    import hashlib

    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return path.stem[:40] + "-" + hashlib.sha256(raw.encode()).hexdigest()[:12]


def converts_here() -> bool:
    """False in an environment with vLLM installed: it reads the book environment's conversions, never makes
    its own (module doc)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is None


def _completed(out: Path) -> dict | None:
    """The ``.complete`` record of a finished conversion in ``out`` ({} when unreadable), or None."""
    if not ((out / "config.json").exists() and (out / ".complete").exists()):
        return None
    try:
        meta = json.loads((out / ".complete").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


@contextlib.contextmanager
def _exclusive(out: Path):
    """One process at a time decides about (and converts) ``out``: the others wait, then find it done."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def hf_folder(gguf: Path, out: Path | None = None) -> Path:
    """The cached HF folder of ``gguf``: converted on first use and whenever the record of the last
    conversion does not fit this code (see the module doc)."""
    gguf = Path(gguf).expanduser()
    out = out or cache_dir() / "gguf" / cache_key(gguf) / "hf"
    with _exclusive(out):
        done = _completed(out)
        why = "not converted yet" if done is None else stale_reason(done, *CONVERSION_DISTS,
                                                                    any_versions=not converts_here())
        if why is None:
            reuse(done)
            return out
        if not converts_here():
            raise MorphError(f"{out} cannot be used ({why}) and this environment (with vLLM) never converts: run "
                             "`bash scripts/setup.sh` first (the book's environment converts with its pinned "
                             "transformers)")
        print(f"morphlib: converting {gguf.name} to a Hugging Face folder ({why}; once, ~1-2 min)...",
              file=sys.stderr)
        with producing(*CONVERSION_DISTS) as meta:
            model, tok, record = _convert(gguf)
        _save(model, tok, {**record, **meta}, out)
    return out


def _convert(gguf: Path):
    """(model, tokenizer, record) of a GGUF: float32 weights, the tokenizer of ``SPM_REBUILT_ARCHS`` rebuilt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    arch = gguf_arch(gguf)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if arch in SPM_REBUILT_ARCHS:
            tok, how = spm_bpe_tokenizer(gguf), "rebuilt by morphlib from the GGUF vocabulary (SentencePiece BPE)"
        else:
            tok, how = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), "transformers' GGUF tokenizer"
    except (OSError, ValueError, KeyError) as exc:
        raise MorphError(f"cannot convert {gguf.name} ({arch}): {str(exc).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok, {"source": str(gguf.resolve()), "size": gguf.stat().st_size, "architecture": arch, "tokenizer": how}


def _save(model, tok, record: dict, out: Path) -> None:
    """Write the folder next to ``out`` and swap it in (``.complete`` = ``record`` last)."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    old = out.with_name(tmp.name.replace(".tmp-", ".old-"))
    if out.exists():
        os.replace(out, old)  # readers see the old folder or the new one, never none for long
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
