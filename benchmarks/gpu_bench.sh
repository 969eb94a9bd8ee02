#!/usr/bin/env bash
# The GPU benchmarks of issue 9, in one call on a machine with one CUDA GPU and torch installed.
#   OUT=results_dir bash benchmarks/gpu_bench.sh            # full sizes (about 8 minutes on an H100)
#   SMALL=1 OUT=/tmp/x bash benchmarks/gpu_bench.sh          # a quick dry run (CPU or GPU)
# Each measurement prints a BENCH/BNCAP/RUN line, appended to $OUT/bench.log as it comes.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:?set OUT}"; mkdir -p "$OUT"; LOG="$OUT/bench.log"
DATA=/tmp/swa_bench_data; LOGS=/tmp/swa_bench_logs; mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=python3; ACC="python3 -m accelerate.commands.launch --quiet --config_file accelerate_configs/single_gpu.yaml"
if [[ -n "${SMALL:-}" ]]; then
  PY="${PY_SMALL:-.venv/bin/python}"; ACC="$PY -m accelerate.commands.launch --quiet --config_file accelerate_configs/cpu.yaml"
  IMAGES=512; SENTENCES=256; DEPTH=20; STEPS=12; WARM=4; TSTEPS=12; EPOCHS=4; BERT="hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=128"
else
  IMAGES=12800; SENTENCES=4096; DEPTH=164; STEPS=80; WARM=20; TSTEPS=120; EPOCHS=5; BERT="hidden_size=768,num_hidden_layers=12,num_attention_heads=12,intermediate_size=3072"
fi
log() { echo "$*" | tee -a "$LOG"; }
bench() { # label, timeout, command...
  local label="$1" limit="$2"; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$label.out" 2>&1; local rc=$?
  log "RUN $label rc=$rc wall_s=$((SECONDS - start)) $(grep -h '^BENCH\|^BNCAP' "$LOGS/$label.out" | tail -1)"
  [[ $rc -ne 0 ]] && tail -5 "$LOGS/$label.out" | tee -a "$LOG"
}
log "START $(date -u +%FT%TZ) $(nvidia-smi -L 2>/dev/null | head -1) torch=$($PY -c 'import torch; print(torch.__version__)')"
[[ -d .whl ]] && $PY -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -2
$PY benchmarks/make_bench_data.py "$DATA" --images "$IMAGES" --sentences "$SENTENCES" > /dev/null 2>&1 || log "data failed"

# 0. Pixels on the device and pixels in host memory (pinned, asynchronous copies) give the same batches.
$PY - <<'PYEOF' 2>&1 | tail -1 | tee -a "$LOG"
import torch
from recipes.vision.data import VisionDataArguments, load_vision_data
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
a, b = (load_vision_data(VisionDataArguments(augment=True)).train for _ in range(2))
a.place(device, True); b.place(device, False)
va, vb = a.view(seed=3, stream=0), b.view(seed=3, stream=0)
same = all(torch.equal(va.__getitems__(list(range(i, i + 64)))["pixel_values"],
                       vb.__getitems__(list(range(i, i + 64)))["pixel_values"]) for i in range(0, 1024, 64))
print(f"PLACEMENT device_vs_host_equal={same} images_on={a.images.device},{b.images.device} batch_on={va[0:4]['pixel_values'].device}")
PYEOF

V=recipes/vision/configs/cifar10_preresnet164.yaml
VARGS="--dataset_name $DATA/cifar10 --depth $DEPTH --swa_start_epoch 0 --output_dir /tmp/swa_bench_runs/v"
# 1. PreResNet-164, batch 128, bf16 autocast: eager, then compiled (inductor), bare loop vs recipe.
bench pre_bare_eager 120 $ACC benchmarks/bench_loop.py bare $V $VARGS --steps $STEPS --warmup $WARM
bench pre_recipe_eager 120 $ACC benchmarks/bench_loop.py recipe $V $VARGS --steps $STEPS --warmup $WARM
# 2. Text: a BERT-base-size model built from a config, batch 32, static shapes at max_length 64.
T=recipes/text/configs/smoke.yaml
TARGS="--model_name_or_path $DATA/tokenizer --dataset_name $DATA/glue --dataset_config_name sst2 --config_overrides $BERT --max_length 64 --pad_to_max_length true --max_train_samples $SENTENCES --per_device_train_batch_size 32 --output_dir /tmp/swa_bench_runs/t"
[[ -z "${SKIP_TEXT:-}" ]] && bench text_bare 120 $ACC benchmarks/bench_loop.py bare $T $TARGS --steps $TSTEPS --warmup $WARM
[[ -z "${SKIP_TEXT:-}" ]] && bench text_recipe 120 $ACC benchmarks/bench_loop.py recipe $T $TARGS --steps $TSTEPS --warmup $WARM
# 3. The default digits job, end to end, on this device.
start=$SECONDS
timeout 100 $ACC recipes/vision/train.py --config recipes/vision/configs/digits_small_cnn.yaml --output_dir /tmp/swa_bench_runs/digits > "$LOGS/digits.out" 2>&1
log "RUN digits_default rc=$? wall_s=$((SECONDS - start)) timings=$(tr -d ' \n' < /tmp/swa_bench_runs/digits/final/timings.json 2>/dev/null) $(grep -A4 'final evaluation' "$LOGS/digits.out" | tr '\n' '|')"
# 1b. The same, compiled (inductor).
bench pre_bare_compiled 240 $ACC benchmarks/bench_loop.py bare $V $VARGS --steps $STEPS --warmup $WARM --compile
bench pre_recipe_compiled 180 $ACC --dynamo_backend inductor benchmarks/bench_loop.py recipe $V $VARGS --steps $STEPS --warmup $WARM
# 4. A CIFAR-schema PreResNet SWA run with the CIFAR configs' cadence (checkpoint every epoch, evaluation
#    every 5), eager, then capped vs full BN passes of its average.
start=$SECONDS
timeout 150 $ACC recipes/vision/train.py --config $V --dataset_name $DATA/cifar10 --depth $DEPTH --label_noise 0.2 --num_train_epochs $EPOCHS --swa_start_epoch 2 --output_dir /tmp/swa_bench_runs/cifar_swa > "$LOGS/cifar_swa.out" 2>&1
log "RUN cifar_swa rc=$? wall_s=$((SECONDS - start)) timings=$(tr -d ' \n' < /tmp/swa_bench_runs/cifar_swa/final/timings.json 2>/dev/null) $(grep -A4 'final evaluation' "$LOGS/cifar_swa.out" | tr '\n' '|')"
bench cifar_bn_cap 120 $ACC benchmarks/bench_bn_cap.py /tmp/swa_bench_runs/cifar_swa $V --dataset_name $DATA/cifar10 --depth $DEPTH --caps 1024 4096 8192 --draws 3
log "END $(date -u +%FT%TZ)"
