#!/usr/bin/env bash
# Issue 8's GPU line, in one call: the text recipe (a BERT-base-size model built from a config) on one GPU
# under FSDP2 with the sharded placement, the same job without FSDP (main placement), and a sharded
# resume that must end with the same weights.
#   OUT=results_dir bash benchmarks/gpu_fsdp2.sh          # on a machine with one CUDA GPU
#   SMALL=1 OUT=/tmp/x bash benchmarks/gpu_fsdp2.sh        # a CPU dry run (no FSDP there: --swa_placement sharded)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:?set OUT}"; mkdir -p "$OUT"; LOG="$OUT/fsdp2.log"
DATA=/tmp/swa_fsdp2_data; RUNS=/tmp/swa_fsdp2_runs; rm -rf "$RUNS"; mkdir -p "$RUNS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=python3; MAIN_CONFIG=accelerate_configs/single_gpu.yaml; SHARDED_CONFIG=accelerate_configs/fsdp2.yaml
SENTENCES=4096; BERT="hidden_size=768,num_hidden_layers=12,num_attention_heads=12,intermediate_size=3072"
if [[ -n "${SMALL:-}" ]]; then
  PY=.venv/bin/python; MAIN_CONFIG=accelerate_configs/cpu.yaml; SHARDED_CONFIG=accelerate_configs/cpu.yaml
  SENTENCES=256; BERT="hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=128"
fi
log() { echo "$*" | tee -a "$LOG"; }
log "START $(date -u +%FT%TZ) $(nvidia-smi -L 2>/dev/null | head -1) torch=$($PY -c 'import torch; print(torch.__version__)')"
[[ -d .whl && -z "${SMALL:-}" ]] && $PY -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -2
$PY benchmarks/make_bench_data.py "$DATA" --images 100 --sentences "$SENTENCES" > /dev/null 2>&1 || log "data failed"

# 2 epochs; averaging every step over the second half, a later candidate at 75% and a side EMA.
ARGS="--config recipes/text/configs/smoke.yaml --model_name_or_path $DATA/tokenizer --dataset_name $DATA/glue
  --dataset_config_name sst2 --config_overrides $BERT --max_length 64 --max_train_samples $SENTENCES
  --per_device_train_batch_size 32 --num_train_epochs 2 --swa_start_fraction 0.5 --swa_update_every_steps 1
  --swa_start_candidates 0.75 --ema_decays 0.99 --checkpointing_steps epoch --learning_rate 1e-4"
run() { # label, run folder, accelerate config, extra args...
  local label="$1" folder="$2" config="$3"; shift 3
  local start=$SECONDS
  timeout 240 $PY -m accelerate.commands.launch --quiet --config_file "$config" recipes/text/train.py $ARGS \
    --output_dir "$RUNS/$folder" "$@" > "$OUT/$label.out" 2>&1
  local rc=$?
  log "RUN $label rc=$rc wall_s=$((SECONDS - start)) $($PY - "$RUNS/$folder" <<'PYEOF' 2>&1 | tail -1
import json, sys, yaml
from pathlib import Path
run = Path(sys.argv[1])
launch = yaml.safe_load((run / "config.yaml").read_text())["launch"]
timings = json.loads((run / "final" / "timings.json").read_text())
candidates = json.loads((run / "final" / "candidates.json").read_text())
updates = max(c["n_averaged"] for c in candidates["candidates"])
print(f"distributed_type={launch['distributed_type']} device={launch['device']} timings={json.dumps(timings)} "
      f"updates={updates} averaging_ms_per_update={1e3 * timings.get('averaging_updates', 0) / max(updates, 1):.3f} "
      f"chosen={candidates['chosen']} swa_validation={candidates['candidates'][0]['metrics']['validation']}")
PYEOF
)"
  [[ $rc -ne 0 ]] && tail -8 "$OUT/$label.out" | tee -a "$LOG"
}
run main_placement main_placement "$MAIN_CONFIG"
run sharded_fsdp2 sharded_fsdp2 "$SHARDED_CONFIG" --swa_placement auto ${SMALL:+--swa_placement sharded}
# A sharded checkpoint mid-run (after the later candidate began), then a resume to the end.
STOP=$(( SENTENCES / 32 * 2 * 7 / 8 ))
run sharded_stop sharded_resumed "$SHARDED_CONFIG" ${SMALL:+--swa_placement sharded} --stop_after_step $STOP
ls "$RUNS/sharded_resumed/checkpoints/"*/ 2>&1 | tr '\n' ' ' | tee -a "$LOG"; echo | tee -a "$LOG"
run sharded_resume sharded_resumed "$SHARDED_CONFIG" ${SMALL:+--swa_placement sharded} --resume_from_checkpoint latest
$PY - "$RUNS" <<'PYEOF' 2>&1 | tail -3 | tee -a "$LOG"
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file
runs = Path(sys.argv[1])
def weights(run, which):
    return load_file(runs / run / "final" / which / "model.safetensors")
def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
for which in ("swa", "base"):
    straight, resumed = weights("sharded_fsdp2", which), weights("sharded_resumed", which)
    same = straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    print(f"COMPARE {which}: resumed_equals_straight={same} max_diff={max_diff(straight, resumed):.3g} "
          f"sharded_vs_main_max_diff={max_diff(weights('main_placement', which), straight):.3g}")
PYEOF
log "END $(date -u +%FT%TZ)"
