"""The run's log: lines on stdout (process 0), a JSONL metrics file and TensorBoard events."""
import json
from pathlib import Path

import jax


class Logger:
  """Log lines on stdout (process 0), a JSONL metrics file and TensorBoard events."""

  def __init__(self, run_dir: Path, cfg):
    self.enabled = jax.process_index() == 0
    self.run_dir, self.cfg = run_dir, cfg
    self.metrics_path = run_dir / 'metrics.jsonl'
    self.tb_dir = run_dir / 'tensorboard'
    self.writer = None

  def start(self, step: int):
    """Opens the files once the first step is known; nothing is written before.

    Resuming at `step` keeps the metrics records before it (and its training record) and drops
    the later ones: a killed run logged them after its last checkpoint, and they come again.
    """
    if not self.enabled:
      return
    self.run_dir.mkdir(parents=True, exist_ok=True)
    (self.run_dir / 'config.json').write_text(self.cfg.to_json(indent=2))
    kept = []
    if step and self.metrics_path.exists():
      for line in self.metrics_path.read_text().splitlines():
        try:
          r = json.loads(line)
        except ValueError:
          continue  # a line cut short by the kill
        if r['step'] < step or (r['step'] == step and 'val_loss' not in r):
          kept.append(line + '\n')
    tmp = self.metrics_path.with_name('metrics.jsonl.tmp')
    tmp.write_text(''.join(kept))
    tmp.replace(self.metrics_path)  # atomic: a kill leaves the old file or the new one
    if self.cfg.log.tensorboard:
      from tensorboardX import SummaryWriter
      # purge_step: TensorBoard hides what a killed run wrote past the resumed step.
      self.writer = SummaryWriter(str(self.tb_dir), purge_step=step + 1 if step else None)

  def print(self, *args):
    if self.enabled:
      print(*args, flush=True)

  def write(self, step: int, record: dict):
    if not self.enabled:
      return
    with self.metrics_path.open('a') as f:
      f.write(json.dumps({'step': step, **record}) + '\n')
    if self.writer:
      for k, v in record.items():
        self.writer.add_scalar(k, v, step)

  def close(self):
    if self.writer:
      self.writer.close()


def duration(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  return f'{m}m{s:02d}s' if m else f'{s}s'


def summary(record: dict) -> str:
  """' | mlm_loss 2.91 | sop_acc 0.62'-style text for the extra metrics of a record."""
  return ''.join(f' | {k} {v:.4g}' for k, v in record.items())
