"""Analytic scale model: Stage II of Llama-3-8B / 70B on TPU v5p and H100 meshes under our sharding rules.

    python bench/scale_model.py                     # the table of bench/README.md
    python bench/scale_model.py --json              # the same as JSON lines

Nothing is compiled or run: FLOPs come from `LlamaConfig.num_params` / `flops_per_token` (plus the exact LM-head
term of our answer-only loss), memory per chip from the parameter shapes and the default logical rules of
`rankrag_jax/model/axes.py` (`embed -> fsdp`; `heads, kv_heads, mlp, vocab -> tensor`; batch over `data x fsdp`),
and time from the chips' published dense bf16 peak, an assumed achievable matmul efficiency, and the FSDP
collectives' volume over the interconnect (reported separately; counted only where it cannot hide behind the
layer's matmuls). For XLA's own per-chip memory and cost-model numbers of the same programs see
`python -m rankrag_jax.train_compile` (AOT compile for a v5p topology).

Model (per optimizer step of `batch` rows x `seq` tokens, every slot a real token, the paper's Stage II: 64 x 4096,
3,300 steps):
  model FLOPs  = 3 x [2 N_layers x tokens + causal attention 2 x 2 x T/2 x H x Dh x L per token]
                 + 3 x 2 x D x V x answer tokens (LM head only where the loss looks; `max_loss_positions` per row)
  executed     = model FLOPs + the recomputed forward under remat ("full": + 1 forward of the layers,
                 "dots": + attention only, matmul outputs are saved)
  step time    = executed / (chips x peak x efficiency), + the part of the FSDP collectives that exceeds the
                 compute of the layers they overlap with
  MFU          = model FLOPs / (step time x chips x peak)
  memory/chip  = (f32 params + f32 grads + 2 f32 Adam moments) / (fsdp x tensor)
                 + remat-saved activations + one layer's working set (incl. the [B, H, T, T] f32 attention scores
                   that `jax.nn.dot_product_attention`'s XLA implementation materialises)
                 + 2 gathered layers of bf16 weights (the one in use and the one being prefetched)
"""

import argparse
import dataclasses
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from rankrag_jax.model import config as config_lib  # noqa: E402

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_bf16: float      # dense FLOP/s per chip
  hbm_bytes: float
  link_bytes_per_s: float  # per-chip bandwidth a ring collective over the FSDP axis can use (one direction)
  efficiency: float     # assumed fraction of peak large bf16 matmuls reach in a well-fused step


# Published figures: v5p 459 TFLOP/s bf16, 95 GB HBM2e, ICI 4,800 Gb/s per chip (600 GB/s over its 6 links; a
# 1-D ring over one torus axis uses 2 links both ways, ~200 GB/s one way); H100 SXM 989 TFLOP/s dense bf16, 80 GB,
# NVLink 900 GB/s total (450 GB/s each way); A100 312 TFLOP/s bf16. Efficiencies are assumptions (0.6 is what
# MaxText-class code reports for dense Llama training on v5p; 0.5 for H100 with XLA, no cuDNN flash attention).
V5P = Chip("TPU v5p", 459e12, 95e9, 200e9, 0.60)
H100 = Chip("H100 SXM", 989e12, 80e9, 450e9, 0.50)
A100 = Chip("A100", 312e12, 80e9, 300e9, 0.50)


@dataclasses.dataclass(frozen=True)
class Mesh:
  name: str
  chip: Chip
  data: int
  fsdp: int
  tensor: int
  # per-chip bandwidth of the fsdp / data axes when they leave the chip's fast domain (H100 nodes: 8 x 400 Gb/s
  # InfiniBand = 50 GB/s per GPU); None: the chip's own link bandwidth.
  fsdp_bytes_per_s: float | None = None
  data_bytes_per_s: float | None = None

  @property
  def chips(self) -> int:
    return self.data * self.fsdp * self.tensor


IB = 50e9
# The first four match gin_configs/meshes/{tpu_v5p_64,tpu_v5p_128,tpu_v5p_256,gpu_8xh100}.gin.
MESHES = (
    Mesh("v5p-64 (32 chips) fsdp 32", V5P, 1, 32, 1),
    Mesh("v5p-128 (64 chips) fsdp 64", V5P, 1, 64, 1),
    Mesh("v5p-256 (128 chips) fsdp 64 x tensor 2", V5P, 1, 64, 2),
    Mesh("8xH100 (1 node) fsdp 8", H100, 1, 8, 1),
    Mesh("8xH100 (1 node) fsdp 4 x tensor 2", H100, 1, 4, 2),
    Mesh("32xH100 (4 nodes) fsdp 32", H100, 1, 32, 1, fsdp_bytes_per_s=IB),
    Mesh("32xH100 (4 nodes) data 4 x fsdp 8", H100, 4, 8, 1, data_bytes_per_s=IB),
)

PAPER = {"llama3_8b": {"gpus": 32, "hours_stage2": 6.0, "hours_total": 10.0},
         "llama3_70b": {"gpus": 128, "hours_stage2": None, "hours_total": 16.0}}
REMAT = {"llama3_8b": "dots", "llama3_70b": "full"}  # as gin_configs/meshes/tpu_v5p_128.gin sets them


def layer_params(cfg) -> float:
  return cfg.num_params - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2) - cfg.hidden_size


def step_flops(cfg, batch: int, seq: int, answer_tokens_per_row: int) -> dict:
  tokens = batch * seq
  attention = 2 * 2 * (seq / 2) * cfg.num_heads * cfg.head_dim * cfg.num_layers  # per token, causal
  forward_layers = (2 * layer_params(cfg) + attention) * tokens
  head = 2 * cfg.hidden_size * cfg.vocab_size * answer_tokens_per_row * batch
  model = 3 * (forward_layers + head)
  full_head = 3 * 2 * cfg.hidden_size * cfg.vocab_size * tokens  # had every position gone through the LM head
  return {"tokens": tokens, "model": model, "forward_layers": forward_layers, "attention_forward": attention * tokens,
          "full_vocab_head_would_add": full_head - 3 * head,
          "check_flops_per_token": cfg.flops_per_token(seq) * tokens}


def memory_per_chip(cfg, mesh: Mesh, batch: int, seq: int, remat: str, micro_batches: int) -> dict:
  shards = mesh.fsdp * mesh.tensor
  params = cfg.num_params
  state = 16 * params / shards  # f32 params, grads, mu, nu
  rows = batch / (mesh.data * mesh.fsdp) / micro_batches  # rows per chip per micro-batch
  tokens = rows * seq
  d, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  hq = cfg.num_heads / mesh.tensor
  hkv = max(cfg.num_kv_heads / mesh.tensor, 1)
  dh = cfg.head_dim
  # bf16 activations kept for the backward pass, per layer per token
  dots_saved = hq * dh + 2 * hkv * dh + d + 2 * f / mesh.tensor + d
  everything = dots_saved + 4 * d + 3 * f / mesh.tensor + 2 * hq * dh  # + norms, silu, rope'd q/k, attn out
  per_layer_token = {"full": d, "dots": dots_saved + d, "none": everything}[remat]
  saved = 2 * per_layer_token * tokens * l
  scores = 4 * 2 * rows * hq * seq * seq  # f32 logits + probabilities of one layer
  working = 2 * everything * tokens * 2 + scores  # one layer recomputed in the backward, with its gradients
  gathered_weights = 2 * 2 * layer_params(cfg) / l / mesh.tensor
  logits = 4 * rows * 1024 * cfg.vocab_size / mesh.tensor * 2  # [rows, K=1024, V] f32 logits + grad
  total = state + saved + working + gathered_weights + logits
  return {"state_gib": state / GIB, "saved_activations_gib": saved / GIB, "layer_working_set_gib": working / GIB,
          "attention_scores_gib": scores / GIB, "gathered_weights_gib": gathered_weights / GIB,
          "lm_head_gib": logits / GIB, "total_gib": total / GIB, "hbm_gib": mesh.chip.hbm_bytes / GIB,
          "fits": total < 0.9 * mesh.chip.hbm_bytes}


def predict(cfg_name: str, mesh: Mesh, batch: int = 64, seq: int = 4096, steps: int = 3300,
            answer_tokens_per_row: int = 1024) -> dict:
  cfg = config_lib.get_config(cfg_name)
  if batch % (mesh.data * mesh.fsdp):
    raise ValueError(f"{mesh.name}: batch {batch} does not split over data x fsdp = {mesh.data * mesh.fsdp}")
  remat = REMAT[cfg_name]
  fl = step_flops(cfg, batch, seq, answer_tokens_per_row)
  recompute = {"full": fl["forward_layers"], "dots": fl["attention_forward"], "none": 0.0}[remat]
  executed = fl["model"] + recompute
  chip = mesh.chip
  compute_s = executed / (mesh.chips * chip.peak_bf16 * chip.efficiency)
  # FSDP collectives per step, per chip: all-gather bf16 weights for the forward and again for the backward,
  # reduce-scatter f32 gradients; a ring moves (n-1)/n of the full array through each chip's link.
  n = mesh.fsdp
  shard_params = cfg.num_params / mesh.tensor
  fsdp_bytes = (n - 1) / n * shard_params * (2 + 2 + 4)
  fsdp_s = fsdp_bytes / (mesh.fsdp_bytes_per_s or chip.link_bytes_per_s)
  # Tensor parallelism (Megatron): 2 all-reduces of [tokens, D] bf16 per layer forward, 2 backward.
  tp_s = 0.0
  if mesh.tensor > 1:
    local_tokens = batch * seq / (mesh.data * mesh.fsdp)
    tp_bytes = 4 * cfg.num_layers * 2 * (mesh.tensor - 1) / mesh.tensor * local_tokens * cfg.hidden_size * 2
    tp_s = tp_bytes / chip.link_bytes_per_s  # on the critical path (not overlapped)
  # data-parallel all-reduce of each chip's f32 gradient shard across the `data` replicas (overlappable)
  dp_s = 2 * (mesh.data - 1) / mesh.data * 4 * cfg.num_params / (mesh.fsdp * mesh.tensor) / (
      mesh.data_bytes_per_s or chip.link_bytes_per_s)
  exposed = max(0.0, fsdp_s + dp_s - compute_s) + tp_s
  step_s = compute_s + exposed
  micro = 1  # gradient accumulation (num_micro_batches) needed for the activations to fit, if any does
  mem = memory_per_chip(cfg, mesh, batch, seq, remat, micro)
  while not mem["fits"] and micro < batch / (mesh.data * mesh.fsdp):
    micro *= 2
    mem = memory_per_chip(cfg, mesh, batch, seq, remat, micro)
  mfu = fl["model"] / (step_s * mesh.chips * chip.peak_bf16)
  paper = PAPER[cfg_name]
  a100_s = fl["model"] * steps / (paper["gpus"] * A100.peak_bf16)  # at 100% MFU
  return {"model": cfg_name, "mesh": mesh.name, "chips": mesh.chips, "remat": remat, "params_b": cfg.num_params / 1e9,
          "tokens_per_step": fl["tokens"], "model_tflops_per_step": fl["model"] / 1e12,
          "executed_tflops_per_step": executed / 1e12,
          "full_vocab_head_would_add_pct": 100 * fl["full_vocab_head_would_add"] / fl["model"],
          "compute_s": compute_s, "fsdp_collectives_s": fsdp_s, "tensor_allreduce_s": tp_s, "step_s": step_s,
          "mfu": mfu, "stage2_hours": step_s * steps / 3600, "chip_hours": step_s * steps * mesh.chips / 3600,
          "micro_batches_to_fit": micro, "memory": mem,
          "paper_stage2_gpu_hours": (paper["hours_stage2"] or float("nan")) * paper["gpus"],
          "paper_total_gpu_hours": paper["hours_total"] * paper["gpus"],
          "paper_implied_stage2_mfu": (a100_s / (paper["hours_stage2"] * 3600)) if paper["hours_stage2"] else None}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=3300)
  parser.add_argument("--answer_tokens_per_row", type=int, default=1024,
                      help="LM-head positions per row (stage2.gin MAX_LOSS_POSITIONS)")
  args = parser.parse_args()
  rows = [predict(m, mesh, args.batch, args.seq, args.steps, args.answer_tokens_per_row)
          for m in ("llama3_8b", "llama3_70b") for mesh in MESHES]
  if args.json:
    for r in rows:
      print(json.dumps(r))
    return
  for name in ("llama3_8b", "llama3_70b"):
    cfg = config_lib.get_config(name)
    fl = step_flops(cfg, args.batch, args.seq, args.answer_tokens_per_row)
    print(f"{name}: {cfg.num_params / 1e9:.2f}B params; Stage II step {args.batch}x{args.seq} = "
          f"{fl['model'] / 1e15:.1f} PFLOP model FLOPs (6N·tokens + attention + answer-only LM head; "
          f"flops_per_token gives {fl['check_flops_per_token'] / 1e15:.1f}); {args.steps} steps = "
          f"{fl['model'] * args.steps / 1e18:.0f} EFLOP")
  header = (f"{'model':<11}{'mesh':<40}{'remat':<6}{'mem/chip GiB':>13}{'fits':>5}{'ubatch':>7}{'compute s':>10}"
            f"{'FSDP s':>8}{'TP s':>6}{'step s':>8}{'MFU':>6}{'Stage II h':>11}{'chip-h':>8}")
  print(header)
  print("-" * len(header))
  for r in rows:
    m = r["memory"]
    print(f"{r['model']:<11}{r['mesh']:<40}{r['remat']:<6}{m['total_gib']:>13.1f}{('yes' if m['fits'] else 'NO'):>5}"
          f"{(r['micro_batches_to_fit'] if m['fits'] else '-'):>7}{r['compute_s']:>10.2f}{r['fsdp_collectives_s']:>8.2f}"
          f"{r['tensor_allreduce_s']:>6.2f}{r['step_s']:>8.2f}{r['mfu']:>6.0%}{r['stage2_hours']:>11.2f}"
          f"{r['chip_hours']:>8.0f}")
  for name in ("llama3_8b", "llama3_70b"):
    p = PAPER[name]
    r = next(x for x in rows if x["model"] == name)
    implied = f", implied Stage II MFU {r['paper_implied_stage2_mfu']:.0%}" if r["paper_implied_stage2_mfu"] else ""
    stage2 = f"Stage II {p['hours_stage2']} h = {p['hours_stage2'] * p['gpus']:.0f} A100-h, " if p["hours_stage2"] else ""
    print(f"paper {name}: {p['gpus']} A100 x {p['hours_total']} h (Stages I+II) = "
          f"{p['gpus'] * p['hours_total']:.0f} A100-h; {stage2}at 64x4096 tokens/step{implied}")


if __name__ == "__main__":
  main()
