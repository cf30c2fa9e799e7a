#!/usr/bin/env bash
# GPU benchmark in one command (under 8 minutes on one H100/H200): the train step of a 1.2B GPT
# (bf16, selective recomputation, cuDNN flash attention) and of gpt_345m, as one results JSON.
#
#   scripts/bench_gpu.sh --fetch-wheels     # here, with internet: wheels the GPU image lacks -> .whl/
#   scripts/bench_gpu.sh [--out FILE]       # there: installs .whl/ if present, runs, writes FILE
#   scripts/bench_gpu.sh --dry-run          # the same pipeline at toy size on CPU (tested)
set -euo pipefail
cd "$(dirname "$0")/.."

out=bench_gpu_results.json
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out=$2; shift ;;
    --out=*) out=${1#--out=} ;;
    --fetch-wheels)
      # The GPU image has jax, flax, optax, orbax and tensorstore; these it may lack.
      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl ml_collections tensorboardX grain zstandard array_record
      exit 0 ;;
    *) echo "bench_gpu.sh: unknown argument '$1' (use --dry-run, --out FILE, --fetch-wheels)" >&2; exit 2 ;;
  esac
  shift
done

if ! python3 -c 'import ml_collections, tensorboardX' 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/shardlm_site .whl/*.whl
    export PYTHONPATH=/tmp/shardlm_site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "bench_gpu.sh: ml_collections/tensorboardX missing and no .whl/ folder; run --fetch-wheels first" >&2
    exit 2
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ $dry = 1 ]; then
  # Toy sizes, same flags: proves the pipeline end to end without a GPU.
  big=(--config tiny --config.model.num_layers=2 --config.model.dtype=bfloat16
       --config.model.remat=selective --config.data.batch_size=4 --repeats 2)
  small=(--config tiny --config.model.num_layers=1 --config.data.batch_size=4 --repeats 2)
else
  big=(--config gpt_1_2b --config.model.dtype=bfloat16 --config.model.remat=selective
       --config.mesh.data=1 --config.data.batch_size=16 --repeats 10)
  small=(--config gpt_345m --config.model.dtype=bfloat16 --config.model.remat=none
         --config.mesh.data=1 --config.data.batch_size=16 --repeats 10)
fi
python3 scripts/bench.py "${big[@]}" --out "$tmp/big.json"
python3 scripts/bench.py "${small[@]}" --out "$tmp/small.json"
python3 - "$tmp/big.json" "$tmp/small.json" "$out" <<'EOF'
import json, sys
big, small, out = sys.argv[1:]
results = {'gpt_1_2b': json.load(open(big)), 'gpt_345m': json.load(open(small))}
json.dump(results, open(out, 'w'), indent=2)
for name, r in results.items():
  s = r['step']
  print(f"{name}: {s['tokens_per_s']:,.0f} tok/s, {s['tflops_per_device']:.1f} TFLOP/s/device, "
        f"MFU {100 * s['mfu']:.1f}% ({r['peak_source']})")
print(f'results: {out}')
EOF
