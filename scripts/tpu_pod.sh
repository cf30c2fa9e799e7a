#!/bin/bash
# shardlm on a Cloud TPU pod: the same command on every worker (host) of the pod, over SSH.
#
#   bash scripts/tpu_pod.sh TPU_NAME ZONE -- --config gpt_8b.py --config.mesh.model=4
#   bash scripts/tpu_pod.sh TPU_NAME ZONE --project P --dir '~/shardlm' -- --config gpt_8b.py
#   bash scripts/tpu_pod.sh TPU_NAME ZONE --dry-run -- --config gpt_8b.py     # print, run nothing
#
# Every worker must hold the repository at --dir (default ~/shardlm) with shardlm installed
# (pip install -e .). JAX finds the pod's workers itself (dist.method=tpu); data parallelism
# crosses hosts, the model axis stays within one host's chips. A maintenance event's SIGTERM
# makes every worker save at one agreed step and exit with status 75: run the command again.
set -euo pipefail
usage="usage: bash scripts/tpu_pod.sh TPU_NAME ZONE [--project P] [--dir DIR] [--dry-run] -- TRAIN_ARGS..."
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
name=$1 zone=$2
shift 2
project=() dir='~/shardlm' dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --project) project=(--project "$2"); shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unexpected '$1'; $usage" >&2; exit 2 ;;
  esac
done
remote="cd $dir && python3 -m shardlm.train --config.dist.method=tpu"
[ $# -gt 0 ] && remote+=$(printf ' %q' "$@")
cmd=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project[@]}" --worker=all --command "$remote")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
