#!/usr/bin/env bash
# Write the commit a device call's results will name into .gpu-commit (gitignored; carry it with each call:
# scripts/gpu_call.sh and scripts/gpu_burst.sh read it where MORPHBOOK_GIT_COMMIT is unset, and then record a
# clean tree). Refuses while the tree holds changes, which would travel and run without being in that commit.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! git diff --quiet HEAD -- || [ -n "$(git ls-files --others --exclude-standard)" ]; then
  echo "error: the tree holds uncommitted changes (git status): commit them first, the results will name the commit" >&2
  exit 2
fi
git rev-parse HEAD > .gpu-commit
echo "device calls will name commit $(cut -c1-7 .gpu-commit) (carry .gpu-commit)"
