#!/usr/bin/env bash
# swa-accel launcher.
#
#   ./run.sh                                   # the offline default job (vision, digits)
#   ./run.sh RECIPE.yaml [--key value ...]     # any recipe config, with overrides
#   ./run.sh --accelerate_config accelerate_configs/cpu_2proc.yaml RECIPE.yaml ...
#   ./run.sh test [pytest args]                # the test suite
#
# On first use it builds its own virtualenv (.venv, or $SWA_ACCEL_VENV) from requirements.txt and
# rebuilds it whenever requirements.txt changes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${SWA_ACCEL_VENV:-$ROOT/.venv}"
DEFAULT_RECIPE="recipes/vision/configs/digits_small_cnn.yaml"
cd "$ROOT"

ensure_venv() {
  local want stamp="$VENV/.requirements.sha256"
  want="$(sha256sum requirements.txt | cut -d' ' -f1)"
  if [[ -x "$VENV/bin/python" && "$(cat "$stamp" 2>/dev/null)" == "$want" ]]; then
    return
  fi
  echo "run.sh: building $VENV from requirements.txt (first use only)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  echo "$want" > "$stamp"
}

default_accelerate_config() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    echo "accelerate_configs/single_gpu.yaml"
  else
    echo "accelerate_configs/cpu.yaml"
  fi
}

ensure_venv
export HF_HUB_DISABLE_TELEMETRY=1

if [[ "${1:-}" == "test" ]]; then
  shift
  # The suite never touches the Hub: all data and models are built locally.
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  exec "$VENV/bin/python" -m pytest tests "$@"
fi

ACCELERATE_CONFIG=""
if [[ "${1:-}" == "--accelerate_config" ]]; then
  ACCELERATE_CONFIG="${2:?run.sh: --accelerate_config needs a file}"
  shift 2
fi
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$(default_accelerate_config)}"
[[ -f "$ACCELERATE_CONFIG" ]] || { echo "error: accelerate_config: '$ACCELERATE_CONFIG' does not exist" >&2; exit 2; }

RECIPE="$DEFAULT_RECIPE"
if [[ $# -gt 0 && "$1" != --* ]]; then
  RECIPE="$1"
  shift
fi
[[ -f "$RECIPE" ]] || { echo "error: config: '$RECIPE' does not exist" >&2; exit 2; }
# A recipe's configs live in recipes/<name>/configs/; its script is recipes/<name>/train.py.
SCRIPT="$(dirname "$(dirname "$RECIPE")")/train.py"
[[ -f "$SCRIPT" ]] || { echo "error: config: no train.py beside '$RECIPE' (expected $SCRIPT)" >&2; exit 2; }

exec "$VENV/bin/accelerate" launch --quiet --config_file "$ACCELERATE_CONFIG" "$SCRIPT" --config "$RECIPE" "$@"
