"""Can a BERT config learn sentence order on its data at all? Train on the sentence-order loss
alone, on unmasked rows, and report held-out accuracy as it goes.

  python scripts/sop_probe.py --steps 1200                       # bert_tiny on the stdlib
  python scripts/sop_probe.py --steps 400 --config.model.seq_len=512 --config.data.batch_size=8

The rows are the training run's own ([CLS] A [SEP] B [SEP], whole lines, swapped half the
time), with no token masked and the masked-LM loss weighted 0, so every update serves the
sentence-order head. Accuracy is measured on --eval-rows validation rows; the rate of the
majority label among them (what a constant prediction scores) is printed first.
"""
import argparse
import sys
import time

import jax
import numpy as np

from shardlm import config as config_lib, train
from shardlm.data import tokenizer as tokenizer_lib


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--steps', type=int, default=1200)
  parser.add_argument('--evals', type=int, default=4, help='held-out evaluations over the run')
  parser.add_argument('--eval-rows', type=int, default=1024)
  args, rest = parser.parse_known_args()
  try:
    if args.steps < 1 or args.evals < 1 or args.eval_rows < 1:
      raise config_lib.ConfigError('--steps, --evals and --eval-rows must be >= 1')
    if any(a.startswith('--config.train.steps') for a in rest):
      raise config_lib.ConfigError('set the number of steps with --steps, not --config.train.steps')
    cfg = config_lib.parse_args(['--config', 'bert_tiny', *rest])  # a later --config wins
    config_lib.override(cfg, 'train.steps', str(args.steps))
    if cfg.model.kind != 'bert':
      raise config_lib.ConfigError(f'model.kind={cfg.model.kind}: the probe needs a BERT config')
    s = train.setup(cfg, jax.devices()[:1])
    _, train_rows, val_rows = train.make_data(cfg, s.rt, tokenizer_lib.get_tokenizer(cfg.data.tokenizer))
  except config_lib.ConfigError as e:
    print(f'shardlm: error: {e}', file=sys.stderr)
    sys.exit(2)
  B = cfg.data.batch_size

  def unmasked(batch):
    batch = dict(batch, ids=batch['labels'], mlm_mask=np.zeros_like(batch['mlm_mask']))
    return jax.tree.map(jax.device_put, batch, s.batch_sharding)

  val = [val_rows.rows(i, 0, B) for i in range(max(1, args.eval_rows // B))]
  labels = np.concatenate([b['order'] for b in val])
  print(f'{len(labels)} held-out rows; a constant prediction scores '
        f'{max(labels.mean(), 1 - labels.mean()):.3f}', flush=True)
  state, t0 = s.init(), time.perf_counter()
  at = set(np.linspace(0, args.steps, args.evals + 1).round().astype(int)[1:])
  for step in range(args.steps):
    state, metrics = s.step(state, unmasked(train_rows.rows(step, 0, B)))
    if step + 1 in at:
      acc = np.mean([float(s.eval_metrics(state['params'], unmasked(b))[1]['sop_acc']) for b in val])
      print(f'step {step + 1:>6} | held-out sop_acc {acc:.3f} | train sop_loss '
            f'{float(metrics["sop_loss"]):.4f} | {time.perf_counter() - t0:.0f}s', flush=True)


if __name__ == '__main__':
  main()
