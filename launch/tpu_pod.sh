#!/usr/bin/env bash
# maskjax on a Cloud TPU VM slice: create (or reuse) the slice, copy this checkout to every worker,
# install, and run the same `maskjax` command on all workers at once.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR -- train --config configs/mae_imagenet.py:vit_l16 --workdir gs://BUCKET/runs/mae_l
#   launch/tpu_pod.sh mae-v4 us-central2-b v4-64 -- train --config configs/mae_imagenet.py --workdir gs://BUCKET/mae_b \
#       --config.data.data_dir=gs://BUCKET/tfds
#
# JAX finds the slice's workers itself (TPU metadata), so maskjax needs no process flags. The workdir is a
# bucket (or a file system every worker mounts): Orbax writes there from every worker. A gs:// data_dir is
# copied to each worker's disk on first use (README: "Running on a TPU pod"). Run the same command again
# to resume, on this slice or another of any size.
# Environment: PROJECT (default: gcloud's), VERSION (TPU runtime, default tpu-ubuntu2204-base),
# SPOT=1 for spot capacity, SKIP_INSTALL=1 to reuse an installed checkout.
set -euo pipefail

if [[ $# -lt 4 || "$4" != "--" ]]; then
  echo "usage: launch/tpu_pod.sh NAME ZONE ACCELERATOR -- MASKJAX_ARGS..." >&2
  exit 2
fi
NAME=$1 ZONE=$2 ACCELERATOR=$3
shift 4
VERSION=${VERSION:-tpu-ubuntu2204-base}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TPU="gcloud compute tpus tpu-vm"

if ! $TPU describe "$NAME" --zone "$ZONE" $PROJECT_FLAG >/dev/null 2>&1; then
  echo "tpu_pod: creating $ACCELERATOR slice $NAME in $ZONE"
  $TPU create "$NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$VERSION" \
    $PROJECT_FLAG ${SPOT:+--spot}
else
  echo "tpu_pod: reusing $NAME in $ZONE"
fi

if [[ -z "${SKIP_INSTALL:-}" ]]; then
  ARCHIVE=$(mktemp --suffix=.tar.gz)
  git -C "$ROOT" archive --format=tar.gz --prefix=maskjax/ -o "$ARCHIVE" HEAD
  $TPU scp "$ARCHIVE" "$NAME":maskjax.tar.gz --zone "$ZONE" --worker=all $PROJECT_FLAG
  rm -f "$ARCHIVE"
  $TPU ssh "$NAME" --zone "$ZONE" --worker=all $PROJECT_FLAG --command \
    "rm -rf maskjax && tar xzf maskjax.tar.gz && cd maskjax && python3 -m venv .venv && \
     .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[tpu,gcs]'"
fi

# The same command on every worker; quoting survives the ssh hop.
ARGS=$(printf '%q ' "$@")
$TPU ssh "$NAME" --zone "$ZONE" --worker=all $PROJECT_FLAG --command \
  "cd maskjax && .venv/bin/maskjax $ARGS 2>&1 | tee -a maskjax.log"
