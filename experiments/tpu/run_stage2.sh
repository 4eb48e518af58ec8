#!/usr/bin/env bash
# RankRAG Stage II on a Cloud TPU v5p slice. Run on EVERY host of the slice at once (experiments/tpu/README.md):
#   gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
#       --command="MODEL=llama3_8b SLICE=tpu_v5p_128 BUCKET=gs://my-bucket INIT=... bash ~/rankrag_jax/experiments/tpu/run_stage2.sh"
# Every host runs the same SPMD program: `--distributed` calls jax.distributed.initialize(), which finds the other
# hosts through the TPU metadata; each host reads its own 1/num_hosts of every batch (shard_id = process index)
# and `global_batch` assembles the rows into one array sharded over the mesh's data axes. Checkpoints (orbax,
# every host writing its own shards) go to $BUCKET/runs/...; re-running the same command resumes from the newest.
set -euo pipefail

: "${MODEL:?llama3_8b or llama3_70b}"
: "${SLICE:?tpu_v5p_64, tpu_v5p_128 or tpu_v5p_256 (gin_configs/meshes/)}"
: "${BUCKET:?gs://bucket for checkpoints and the blend}"
: "${INIT:?Stage-I run dir (gs://.../runs/stage1_...) or a local HF directory present on every host}"
RUN="${RUN:-stage2_${MODEL}_${SLICE}}"
TOKENIZER="${TOKENIZER:-/tmp/rankrag/llama3_tokenizer.json}"
BLEND_DIR="${BLEND_DIR:-/tmp/rankrag/blend}"
REPO="${REPO:-$HOME/rankrag_jax}"

# The blend is read from local disk by SeqIO on every host: copy the one built once (README step 3).
mkdir -p "$(dirname "$BLEND_DIR")"
[ -f "$BLEND_DIR/manifest.json" ] || gsutil -m -q cp -r "$BUCKET/blend" "$BLEND_DIR"
[ -f "$TOKENIZER" ] || gsutil -q cp "$BUCKET/llama3_tokenizer.json" "$TOKENIZER"

cd "$REPO"
python -m rankrag_jax.train \
  --gin_file=gin_configs/stage2.gin \
  --gin_file="gin_configs/models/${MODEL}.gin" \
  --gin_file="gin_configs/meshes/${SLICE}.gin" \
  --gin_bindings="MODEL_DIR = '${BUCKET}/runs/${RUN}'" \
  --gin_bindings="INIT_CHECKPOINT = '${INIT}'" \
  --gin_bindings="TOKENIZER_PATH = '${TOKENIZER}'" \
  --gin_bindings="BLEND_DIR = '${BLEND_DIR}'" \
  --distributed \
  2>&1 | tee "/tmp/${RUN}.host$(hostname).log"
