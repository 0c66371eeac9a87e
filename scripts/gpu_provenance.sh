# Sourced by scripts/gpu_call.sh and scripts/gpu_burst.sh: the commit the device call's results name. The tree
# travels without .git, so it comes from MORPHBOOK_GIT_COMMIT or from .gpu-commit (scripts/gpu_commit.sh writes
# it on a clean tree only, hence a clean tree is recorded).
if [ -z "${MORPHBOOK_GIT_COMMIT:-}" ] && [ -f .gpu-commit ]; then
  export MORPHBOOK_GIT_COMMIT="$(cat .gpu-commit)" MORPHBOOK_GIT_DIRTY=0
fi
[ -n "${MORPHBOOK_GIT_COMMIT:-}" ] || git rev-parse HEAD >/dev/null 2>&1 || {
  echo "error: no .git here: carry .gpu-commit (bash scripts/gpu_commit.sh) or pass MORPHBOOK_GIT_COMMIT=<sha>" >&2; exit 2; }
