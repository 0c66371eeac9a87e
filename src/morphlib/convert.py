"""GGUF files to cached Hugging Face folders, with a tokenizer built from the GGUF's own vocabulary where needed.

``hf_folder(gguf)`` converts a GGUF once (dequantized float32 safetensors + tokenizer + config) into
``$MORPHLIB_CACHE/gguf/<key>/hf`` and returns that folder; later loads take seconds instead of the
75-100 s that transformers needs to dequantize a GGUF. The key is the file's resolved path, size and
modification time, so an edited or replaced file is converted again.

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

import json
import os
import shutil
import sys
from pathlib import Path

from morphlib.errors import MorphError

SPM_REBUILT_ARCHS = ("gemma", "gemma2", "gemma3", "gemma3_text")  # archs whose GGUF tokenizer transformers gets wrong
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # GGUF token types


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_arch(path: Path) -> str:
    from gguf import GGUFReader

    return str(_field(GGUFReader(str(path)), "general.architecture", "unknown"))


def spm_bpe_tokenizer(path: Path):
    """A transformers tokenizer for a GGUF whose ``tokenizer.ggml.model`` is ``llama`` (SentencePiece),
    built from its tokens, scores and token types (see the module doc for the exact rules)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(path))
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


def hf_folder(gguf: Path, out: Path | None = None) -> Path:
    """The cached HF folder of ``gguf`` (converted on first use; see the module doc)."""
    gguf = Path(gguf).expanduser()
    if out is None:
        from morphlib.assets import cache_dir

        out = cache_dir() / "gguf" / cache_key(gguf) / "hf"
    if (out / "config.json").exists() and (out / ".complete").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    arch = gguf_arch(gguf)
    print(f"morphlib: converting {gguf.name} ({arch}) to a Hugging Face folder (once; ~1-2 min)...", file=sys.stderr)
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
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(json.dumps({"source": str(gguf.resolve()), "size": gguf.stat().st_size,
                                               "architecture": arch, "tokenizer": how}) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out
