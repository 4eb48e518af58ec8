#!/usr/bin/env bash
# RankRAG Stage II on a Cloud TPU v5p slice: run on EVERY host at once (experiments/tpu/README.md, step 4):
#   gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="MODEL=llama3_70b \
#       SLICE=tpu_v5p_128 RUN=gs://BUCKET/rankrag/llama3_70b bash ~/rankrag_jax/experiments/tpu/run_stage2.sh"
# All hosts run the same SPMD program. `--distributed` calls jax.distributed.initialize(), which finds the
# coordinator and this host's process id from the TPU metadata; each host reads its own shard of every batch
# (shard_id = jax.process_index(), batch 64 / hosts rows) and the rows are assembled into one global array
# sharded over the mesh's data axes. Orbax writes every host's parameter shards into one checkpoint under
# $RUN/stage2/checkpoints on GCS; re-running the same command resumes from the newest complete step.
set -euo pipefail

: "${MODEL:?llama3_8b | llama3_70b (gin_configs/models/)}"
: "${SLICE:?tpu_v5p_64 | tpu_v5p_128 | tpu_v5p_256 (gin_configs/meshes/)}"
: "${RUN:?gs://BUCKET/rankrag/<model>: Stage-II goes to \$RUN/stage2}"
INIT="${INIT:-$RUN/stage1}"  # the Stage-I run directory (each host reads only its own shards)
REPO="${REPO:-$HOME/rankrag_jax}"

cd "$REPO"
TOKENIZER="${TOKENIZER:-$(python -c 'from rankrag_jax import assets; print(assets.asset_file("llama3_tokenizer"))')}"
EXTRA=()
if [[ -n "${BLEND_DIR:-}" ]]; then EXTRA+=(--gin_bindings="BLEND_DIR = '${BLEND_DIR}'"); fi  # else: built per host

python -m rankrag_jax.train --distributed \
  --gin_file=gin_configs/stage2.gin \
  --gin_file="gin_configs/models/${MODEL}.gin" \
  --gin_file="gin_configs/meshes/${SLICE}.gin" \
  --gin_bindings="MODEL_DIR = '${RUN}/stage2'" \
  --gin_bindings="INIT_CHECKPOINT = '${INIT}'" \
  --gin_bindings="TOKENIZER_PATH = '${TOKENIZER}'" \
  "${EXTRA[@]}" \
  2>&1 | tee "/tmp/stage2_${MODEL}.log"
