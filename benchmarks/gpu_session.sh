#!/usr/bin/env bash
# Everything the open GPU work asks of a CUDA machine, in three calls of at most 10 minutes.
#
#   bash benchmarks/gpu_session.sh bench    # `megabatch bench` on the GPU (issue 4's figures)
#   bash benchmarks/gpu_session.sh checks   # each CUDA path once: nvJPEG decode, bf16/fp16, compile, NCCL
#   bash benchmarks/gpu_session.sh tests    # the test suite with a GPU visible
#   bash benchmarks/gpu_session.sh study    # the 90-epoch study on the GPU, several runs at once
#       (STUDY_SPEC=fashion-mnist-paper-budget-tuned for the tuned extension; PARALLEL=8)
#
# A study stops cleanly at its time limit (the runs checkpoint) and continues on the next
# call: it works in $OUT/<folder>, starting from benchmarks/results/<folder> if the
# checkout has it. Copy $OUT/<folder> back there (checkpoints included: carry that folder
# on the next call, since git ignores checkpoints) and call again until it says it finished.
#
# It runs megabatch from source (PYTHONPATH=src) with whatever torch the machine has
# (torch 2.11 on the lent H100/H200) and installs nothing. Results and logs go to
# $OUT (the device tool's output folder) or ./gpu-session-out.
#
# On a lent machine (see .library/device/README.md), Fashion-MNIST travels beside the
# repository; here, once:
#   mkdir -p .carry && cp -r /usr/share/datasets/fashion-mnist .carry/ && echo /.carry/ >> .git/info/exclude
# then run each part with carry [".carry"]. Copy $OUT/results/*.json into
# benchmarks/results/ unchanged and commit it.
#
# On a machine without a GPU the same commands run on the CPU, which is how this
# script itself is checked (`bash benchmarks/gpu_session.sh checks --quick`).
set -uo pipefail
part=${1:-}
quick=${2:-}
out=${OUT:-gpu-session-out}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
fashion=.carry/fashion-mnist
[ -d "$fashion" ] || fashion=/usr/share/datasets/fashion-mnist
failed=()

say() { printf '\n=== %s\n' "$*"; }
# run NAME SECONDS COMMAND...: time-limited, logged to $out/NAME.log, failure remembered
run() {
  local name=$1 limit=$2; shift 2
  say "$name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "--- $name: exit $rc after $((SECONDS - start)) s"
  if [ "$rc" = 75 ]; then echo "--- $name: stopped at its time limit; the same call continues it"
  elif [ "$rc" != 0 ]; then failed+=("$name (exit $rc)"); fi
}

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$py" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| torchvision', torchvision.__version__, '| cuda', torch.version.cuda, '| gpu',
torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
nproc

case $part in
bench)
  # Defaults on a GPU: 224 px, batch 256, 20 steps x 5 repeats, torch.compile of the fastest.
  run bench 560 "$py" -m megabatch bench --out "$out/results" ${quick:+--quick}
  ;;
checks)
  if [ -n "$quick" ]; then size=32; steps=2; else size=128; steps=20; fi
  tiny=$out/tiny-imagenet
  # resnet50 NAME SECONDS --set ...: the paper's recipe for a few steps on the generated folder
  resnet50() {
    local name=$1 limit=$2; shift 2
    run "$name" "$limit" "$py" -m megabatch train --recipe paper-resnet50-imagenet-32k --data "$tiny" \
        --out "$out/runs/$name" --set data.image_size=$size --set data.resize_size=$((size * 8 / 7)) \
        --set batch.global_batch=128 --set batch.per_worker_batch=32 --set train.max_steps=$steps \
        --set train.epochs=1 "$@"
  }
  run tiny-imagenet 60 "$py" scripts/make_tiny_imagenet.py "$tiny" --classes 10 --train-per-class 64 \
      --val-per-class 16 --size $((size * 5 / 4)) --fashion-dir "$fashion"
  # ResNet-50, the paper's recipe, JPEGs decoded in batches on the device (nvJPEG on CUDA),
  # bf16 autocast, channels-last (the "auto" memory format on CUDA); then eval of the checkpoint.
  for decoder in device pil; do
    resnet50 "resnet50-$decoder" 150 --set data.decoder=$decoder --set train.precision=bf16
  done
  resnet50 resnet50-fp16 240 --set train.precision=fp16 --set train.compile=true
  run eval 60 "$py" -m megabatch eval --checkpoint "$out/runs/resnet50-fp16/final.pt" --data "$tiny"
  # One process under torchrun: the NCCL process group (gloo without a GPU), DDP and its fp16 hook.
  run torchrun-1 120 "$py" -m torch.distributed.run --nproc-per-node=1 -m megabatch train \
      --recipe fashion-mnist-demo --data "$fashion" --out "$out/runs/torchrun-1" \
      --set train.max_steps=$((steps * 5)) --set train.epochs=1
  ;;
study)
  spec=${STUDY_SPEC:-fashion-mnist-paper-budget}
  folder=study-$spec-gpu
  [ -n "$quick" ] && folder=$folder-quick
  mkdir -p "$out/$folder"
  [ -d "benchmarks/results/$folder" ] && cp -r "benchmarks/results/$folder/." "$out/$folder/"
  if [ -n "$quick" ]; then
    tiny=(--epochs 1 --seeds 0 --set data.train_subset=9216 --set data.validation_images=1024
          --set data.test_subset=500 --set train.max_steps=2)
  else
    tiny=()
  fi
  # --preserve-status: at the limit timeout's SIGTERM makes the study checkpoint and exit 75.
  run "$folder" 570 timeout --preserve-status 560 "$py" -m megabatch study --spec "$spec" \
      --parallel "${PARALLEL:-8}" --data "$fashion" --out "$out/$folder" "${tiny[@]}"
  ;;
tests)
  if [ -n "$quick" ]; then tests=(tests/data/test_imagenet.py); else tests=(tests); fi
  run tests 570 "$py" -m pytest -q -p no:cacheprovider "${tests[@]}"
  ;;
*)
  echo "usage: bash benchmarks/gpu_session.sh bench|checks|tests|study [--quick]" >&2
  exit 2
  ;;
esac

say "summary"
if [ ${#failed[@]} = 0 ]; then echo "all steps passed"; else printf 'FAILED: %s\n' "${failed[@]}"; exit 1; fi
