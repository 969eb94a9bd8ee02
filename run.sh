#!/usr/bin/env bash
# swa-accel launcher.
#
#   ./run.sh                                   # the offline default job (vision, digits)
#   ./run.sh RECIPE.yaml [--key value ...]     # any recipe config (from anywhere, see its `recipe:` key), with overrides
#   ./run.sh --accelerate_config accelerate_configs/cpu_2proc.yaml RECIPE.yaml ...
#   ./run.sh [RECIPE.yaml] --help              # every option of that config's recipe (the default job's: vision)
#   ./run.sh test [PATH ...] [pytest args]     # the test suite, or just the tests at PATH
#   ./run.sh test-cluster [pytest args]        # the cluster suite (tests/cluster): signals, restarts, 2 machines
#   ./run.sh test-xla [pytest args]            # the XLA suite (tests/xla) on XLA's CPU device, in .venv-xla
#
# On first use it builds its own virtualenv (.venv, or $SWA_ACCEL_VENV) from requirements.txt, with this checkout
# installed in editable mode (`import swa_accel` works from any folder), and rebuilds it whenever requirements.txt
# or pyproject.toml changes. The XLA suite gets its own (.venv-xla, or $SWA_ACCEL_XLA_VENV):
# requirements.txt with torch_xla's latest release and the torch it is built for (a CUDA build, about 7 GB).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CALLER_DIR="$PWD"  # relative paths on the command line are the caller's
VENV="${SWA_ACCEL_VENV:-$ROOT/.venv}"
XLA_VENV="${SWA_ACCEL_XLA_VENV:-$ROOT/.venv-xla}"
XLA_PINS=("torch==2.9.0" "torch_xla==2.9.0")  # torch_xla's latest release needs exactly this torch
DEFAULT_RECIPE="$ROOT/recipes/vision/configs/digits_small_cnn.yaml"
cd "$ROOT"

# build_venv DIR [--editable]: (re)builds DIR from the requirements read on standard input, unless it was built
# from them; with --editable it also installs this checkout (pyproject.toml) in editable mode, and a change of
# pyproject.toml rebuilds it too.
build_venv() {
  local venv="$1" editable="${2:-}" stamp="$1/.requirements.sha256" requirements want
  requirements="$(cat)"
  want="$(sha256sum <<< "$requirements" | cut -d' ' -f1)"
  if [[ -n "$editable" ]]; then
    want="$want $(sha256sum < pyproject.toml | cut -d' ' -f1)"
  fi
  if [[ -x "$venv/bin/python" && "$(cat "$stamp" 2>/dev/null)" == "$want" ]]; then
    return
  fi
  echo "run.sh: building $venv (first use only)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r /dev/stdin <<< "$requirements"
  if [[ -n "$editable" ]]; then
    # (setuptools' build warnings are shown only if the install fails; the venv's own setuptools, when recent
    # enough, builds it without fetching one)
    local isolation=()
    "$venv/bin/python" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 61)' \
      2>/dev/null && isolation=(--no-build-isolation)
    "$venv/bin/python" -m pip install --quiet --no-deps "${isolation[@]}" -e "$ROOT" > "$venv/editable_install.log" 2>&1 \
      || { cat "$venv/editable_install.log" >&2; exit 1; }
  fi
  echo "$want" > "$stamp"
}

ensure_venv() {
  build_venv "$VENV" --editable < requirements.txt
}

# requirements.txt with its torch pin replaced by XLA_PINS. This machine's pip may cap torch at the release it
# keeps on disk (PIP_CONSTRAINT); that cap is lifted for this venv only.
ensure_xla_venv() {
  { grep -v '^torch==' requirements.txt; printf '%s\n' "${XLA_PINS[@]}"; } | PIP_CONSTRAINT= build_venv "$XLA_VENV"
}

default_accelerate_config() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    echo "$ROOT/accelerate_configs/single_gpu.yaml"
  else
    echo "$ROOT/accelerate_configs/cpu.yaml"
  fi
}

absolute() {  # a path as the caller meant it
  if [[ "$1" == /* ]]; then echo "$1"; else echo "$CALLER_DIR/$1"; fi
}

# A config path as given: from the caller's folder, else from the clone (as the YAML headers write it:
# ./run.sh recipes/vision/configs/...); a path found in neither is named as the caller's.
config_path() {
  if [[ "$1" != /* && ! -e "$CALLER_DIR/$1" && -f "$ROOT/$1" ]]; then echo "$ROOT/$1"; else absolute "$1"; fi
}

wants_help() {
  local arg
  for arg in "$@"; do
    [[ "$arg" == "-h" || "$arg" == "--help" ]] && return 0
  done
  return 1
}

# pytest's arguments: `tests` but the cluster suite (tests/cluster, `./run.sh test-cluster`) unless they name test
# paths themselves (a file, a folder or a node id such as tests/test_x.py::test_y), as `pytest PATH` would run just
# those.
test_args() {
  local arg
  for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
      printf '%s\n' "$@"
      return
    fi
  done
  printf '%s\n' tests --ignore=tests/cluster "$@"
}

# Which recipe a config belongs to: its `recipe:` key, else the recipes/<name>/configs/ folder it sits in.
recipe_script() {
  local config="$1" name
  name="$("$VENV/bin/python" -c 'import sys, yaml
data = yaml.safe_load(open(sys.argv[1], encoding="utf-8"))
print(data.get("recipe", "") if isinstance(data, dict) else "")' "$config" 2>/dev/null)" || true
  if [[ -n "$name" ]]; then
    [[ -f "$ROOT/recipes/$name/train.py" ]] || { echo "error: recipe: '$config' names recipe '$name'; the recipes are: $(cd "$ROOT/recipes" && ls -d */ | tr -d / | grep -v __ | paste -sd ' ')" >&2; exit 1; }
    echo "$ROOT/recipes/$name/train.py"
  elif [[ -f "$(dirname "$(dirname "$config")")/train.py" ]]; then
    echo "$(dirname "$(dirname "$config")")/train.py"
  else
    echo "error: recipe: cannot tell which recipe '$config' is for; add a line 'recipe: vision' or 'recipe: text' to it" >&2
    exit 1
  fi
}

export HF_HUB_DISABLE_TELEMETRY=1
if [[ "${1:-}" == "test-xla" ]]; then
  shift
  ensure_xla_venv
  # XLA on the CPU (PJRT_DEVICE=CPU): the same lazy tensors, graphs and counters as on a TPU, with no TPU.
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PJRT_DEVICE=CPU
  # Its files run side by side on two workers (each file's tests in one worker: the recipe runs are one fixture).
  exec "$XLA_VENV/bin/python" -m pytest -n 2 --dist loadfile tests/xla "$@"
fi
ensure_venv

if [[ "${1:-}" == "test-cluster" ]]; then
  shift
  set -- test tests/cluster "$@"
fi
if [[ "${1:-}" == "test" ]]; then
  shift
  # The suite never touches the Hub: all data and models are built locally.
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  mapfile -t PYTEST_ARGS < <(test_args "$@")
  # Test files run side by side on the machine's cores (at most 4; each file's tests stay in one worker, which
  # runs its shared fixtures once). `-n 0` (or any -n) on the command line wins, and -p no:xdist turns it off
  # (other -p options keep it).
  if ! printf '%s\n' "$@" | grep -qE '^(-n|--numprocesses)|no:xdist'; then
    workers="$(nproc 2>/dev/null || echo 1)"
    PYTEST_ARGS=(-n "$(( workers < 4 ? workers : 4 ))" --dist loadfile "${PYTEST_ARGS[@]}")
  fi
  exec "$VENV/bin/python" -m pytest "${PYTEST_ARGS[@]}"
fi

ACCELERATE_CONFIG=""
if [[ "${1:-}" == "--accelerate_config" ]]; then
  ACCELERATE_CONFIG="$(absolute "${2:?run.sh: --accelerate_config needs a file}")"
  shift 2
fi
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$(default_accelerate_config)}"
[[ -f "$ACCELERATE_CONFIG" ]] || { echo "error: accelerate_config: '$ACCELERATE_CONFIG' does not exist" >&2; exit 1; }

RECIPE="$DEFAULT_RECIPE"
if [[ $# -gt 0 && "$1" != -* ]]; then
  RECIPE="$(config_path "$1")"
  shift
fi
if [[ ! -f "$RECIPE" ]]; then
  also=""
  [[ "$RECIPE" == "$CALLER_DIR/"* && "$CALLER_DIR" != "$ROOT" ]] && also=" (nor does '$ROOT/${RECIPE#"$CALLER_DIR/"}')"
  echo "error: config: '$RECIPE' does not exist$also" >&2
  exit 1
fi
SCRIPT="$(recipe_script "$RECIPE")" || exit 1

LAUNCH_ARGS=(--quiet --config_file "$ACCELERATE_CONFIG")
# On a CPU config accelerate picks the thread count itself and warns about it on every run; pick the same
# value here (physical cores), unless OMP_NUM_THREADS already says.
if grep -q "^use_cpu: true" "$ACCELERATE_CONFIG" && [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  LAUNCH_ARGS+=(--num_cpu_threads_per_process "$("$VENV/bin/python" -c 'import psutil; print(psutil.cpu_count(logical=False) or 1)')")
fi
# Outputs and other relative paths in the config or on the command line are relative to where run.sh was called.
cd "$CALLER_DIR"
# --help, and the config's errors in a fraction of a second: checked before torch and the launcher load.
CHECK=("$VENV/bin/python" "$ROOT/swa_accel/runner/early_check.py" "$SCRIPT" --config "$RECIPE" "$@")
if wants_help "$@"; then
  exec "${CHECK[@]}"
fi
"${CHECK[@]}" || exit $?
# (accelerate launch itself, passing SIGTERM and SIGINT sent to this pid on to the training processes, minus its
# traceback on Ctrl-C: the training processes say what was saved.)
exec "$VENV/bin/python" "$ROOT/swa_accel/runner/quiet_launch.py" launch "${LAUNCH_ARGS[@]}" "$SCRIPT" --config "$RECIPE" "$@"
