"""Plot a run's training and validation loss and its throughput: `python scripts/plot_metrics.py RUN_DIR`.

Reads RUN_DIR/metrics.jsonl and writes RUN_DIR/metrics.png (or --out). Needs matplotlib
(`pip install matplotlib`).
"""
import argparse
import json
import sys
from pathlib import Path


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('run_dir')
  parser.add_argument('--out')
  args = parser.parse_args()
  path = Path(args.run_dir) / 'metrics.jsonl'
  if not path.is_file():
    print(f'shardlm: error: {path} not found (a run directory holds metrics.jsonl)', file=sys.stderr)
    sys.exit(2)
  records = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  train = [r for r in records if 'loss' in r]
  val = [r for r in records if 'val_loss' in r]
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ax1.plot([r['step'] for r in train], [r['loss'] for r in train], label='train')
  ax1.plot([r['step'] for r in val], [r['val_loss'] for r in val], 'o-', label='validation')
  ax1.set(xlabel='step', ylabel='loss (nats/token)', title='loss')
  ax1.legend()
  ax2.plot([r['step'] for r in train], [r['tokens_per_s'] for r in train])
  ax2.set(xlabel='step', ylabel='tokens/s', title='throughput')
  fig.suptitle(str(Path(args.run_dir).resolve().name))
  fig.tight_layout()
  out = Path(args.out or Path(args.run_dir) / 'metrics.png')
  fig.savefig(out, dpi=100)
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
