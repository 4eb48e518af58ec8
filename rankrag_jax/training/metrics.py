"""Training metrics out: TensorBoard (tensorboardX), a JSON-lines log and a tqdm progress bar, on host 0 only.

`metrics.jsonl` has one line per step (`{"step": 12, "loss": ..., ...}`) and one per evaluation
(`{"step": 12, "eval/loss": ...}`); tests and scripts read it without TensorBoard. A resumed run appends, so a
step recomputed after a crash appears twice: the later line is the one that counts.
"""

import json
import math
import time

from etils import epath
import jax
import numpy as np
import tqdm


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops_per_device: float, num_devices: int) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s (6·N per token + attention) over the devices' peak."""
  return tokens_per_second * flops_per_token / (peak_flops_per_device * num_devices)


def first_non_finite(rows: list[dict], keys=("loss", "grad_norm")) -> dict | None:
  for row in rows:
    if any(key in row and not math.isfinite(row[key]) for key in keys):
      return row
  return None


class PendingMetrics:
  """Per-step metrics left on the device until a flush fetches them all, so the host does not wait on every
  step; a flush also turns the wall time since the previous one into tokens/s and MFU."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops_per_device: float,
               num_devices: int):
    self._tokens_per_step, self._flops_per_token = tokens_per_step, flops_per_token
    self._peak_flops_per_device, self._num_devices = peak_flops_per_device, num_devices
    self._pending = []
    self.restart_clock()

  def restart_clock(self) -> float:
    """Restarts the throughput clock (after compilation); returns the seconds since the last restart."""
    now = time.time()
    elapsed = now - getattr(self, "_start", now)
    self._start, self._steps = now, 0
    return elapsed

  def add(self, step: int, metrics: dict) -> None:
    self._pending.append((step, metrics))
    self._steps += 1

  def flush(self) -> list[dict]:
    rows = [{"step": s, **{k: float(v) for k, v in jax.device_get(m).items()}} for s, m in self._pending]
    seconds, steps = time.time() - self._start, self._steps
    if steps:
      tokens_per_second = steps * self._tokens_per_step / max(seconds, 1e-9)
      throughput = {"tokens_per_second": tokens_per_second, "seconds_per_step": seconds / steps,
                    "mfu": mfu(tokens_per_second, self._flops_per_token, self._peak_flops_per_device,
                                           self._num_devices)}
      rows = [row | throughput for row in rows]
    self._pending = []
    self.restart_clock()
    return rows


class MetricsWriter:
  """Writes scalars per step; silent on hosts other than 0 (every host computes the same global metrics)."""

  def __init__(self, log_dir, total_steps: int, initial_step: int, progress_bar: bool = True):
    self.enabled = jax.process_index() == 0
    self.log_dir = epath.Path(log_dir)
    self._tensorboard = self._jsonl = self._bar = None
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # local: the import is slow and only host 0 needs it
    self.log_dir.mkdir(parents=True, exist_ok=True)
    self._tensorboard = SummaryWriter(str(self.log_dir / "tensorboard"))
    self._jsonl = (self.log_dir / "metrics.jsonl").open("a")
    if progress_bar:
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()

  def advance(self, step: int, row: dict) -> None:
    """Moves the progress bar to `step`, showing that step's metrics."""
    if self._bar is not None:
      shown = {"loss": "loss", "acc": "accuracy", "lr": "learning_rate", "tok/s": "tokens_per_second"}
      self._bar.n = step
      self._bar.set_postfix({k: f"{row[v]:.4g}" for k, v in shown.items() if v in row}, refresh=True)

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._jsonl.close()


def read_metrics(model_dir) -> list[dict]:
  """metrics.jsonl rows, a recomputed step's later line replacing the earlier one (per step and kind)."""
  rows = {}
  path = epath.Path(model_dir) / "metrics.jsonl"
  for line in path.read_text().splitlines():
    row = json.loads(line)
    kind = "eval" if any(k.startswith("eval/") for k in row) else "train"
    rows[(kind, row["step"])] = row
  return [rows[key] for key in sorted(rows, key=lambda k: (k[1], k[0]))]
