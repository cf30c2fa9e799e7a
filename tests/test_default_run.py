"""The README's first command: `python -m shardlm.train` trains the tiny config on the stdlib."""
import json

import pytest


@pytest.mark.slow
def test_default_run_learns_within_five_minutes(default_run):
  proc, run_dir, elapsed = default_run('float32')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert elapsed < 300, f'default run took {elapsed:.0f}s'

  records = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  val = [r['val_loss'] for r in records if 'val_loss' in r]
  assert val[0] > 5.0  # bytes at initialisation: close to ln 257
  assert val[-1] <= 0.6 * val[0], f'validation loss {val[0]:.3f} -> {val[-1]:.3f}'
  train = [r for r in records if 'loss' in r]
  assert train[-1]['tokens_per_s'] > 0 and 0 < train[-1]['mfu'] < 1
  # Every interval is timed once its steps have finished, the first one too (timed at dispatch,
  # it read 2.25M tok/s and 2639% MFU against ~18k in the others).
  rates = [r['tokens_per_s'] for r in train]
  assert max(rates) < 4 * min(rates), rates
  assert all(r['mfu'] < 1 for r in train), [r['mfu'] for r in train]

  out = proc.stdout
  assert f'run directory: {run_dir}' in out
  assert str(run_dir / 'metrics.jsonl') in out and 'tensorboard --logdir' in out
  assert any(f.name.startswith('events.out.tfevents') for f in (run_dir / 'tensorboard').iterdir())
