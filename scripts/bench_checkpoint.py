"""Benchmark checkpoints: step time while an asynchronous save runs, save and restore MB/s, disk MB/s.

  python scripts/bench_checkpoint.py                       # 8 x 512 GPT (25M params, 306 MB state), 32 x 128
  python scripts/bench_checkpoint.py --config tiny         # the default run's model as it is
  python scripts/bench_checkpoint.py --config tiny --config.model.num_layers=8 \
      --config.model.hidden=512 --config.model.num_heads=8 --config.data.batch_size=8
                                                           # the same state, steps 4x shorter

All in one run, on one model: (1) the disk's sequential write speed, fsync'd like tensorstore's
writes; (2) the median step time without a save; (3) the mean time of the steps during which an
asynchronous save runs, from the step that calls save (its blocking device-to-host copy included)
to the one in which the save commits, over several saves, as a ratio to (2); (4) save MB/s, from
the save call to the commit with nothing else running; (5) restore MB/s, train state read back
into the mesh's shardings (from the page cache: dropping it needs root).
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from shardlm import checkpoint, config as config_lib, train
from shardlm.data.tokenizer import ByteTokenizer

# Unless the command line says otherwise: a batch of 32 x 128 on a model with a 306 MB state.
MEDIUM = ['--config.model.num_layers=8', '--config.model.hidden=512', '--config.model.num_heads=8',
          '--config.data.batch_size=32']


def disk_write_mb_s(directory: Path, size_mb: int, repeats: int = 3) -> float:
  """Sequential write of incompressible bytes in 8 MB blocks, then fsync, as tensorstore syncs;
  the best of a few, since a shared disk's speed varies from second to second."""
  block = np.random.default_rng(0).bytes(8 << 20)
  path = directory / 'disk_speed.bin'
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    with open(path, 'wb') as f:
      for _ in range(size_mb // 8):
        f.write(block)
      f.flush()
      os.fsync(f.fileno())
    best = min(best, time.perf_counter() - t)
    path.unlink()
  return size_mb * (1 << 20) / 1e6 / best


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--dir', help='where to write (default: a temporary directory, removed after)')
  parser.add_argument('--saves', type=int, default=4, help='asynchronous saves to time the steps of')
  parser.add_argument('--steps', type=int, default=8, help='steps timed without a save')
  parser.add_argument('--out', help='write the results as JSON here')
  args, rest = parser.parse_known_args()
  try:
    cfg = config_lib.parse_args(rest if any(a.startswith('--config') for a in rest) else MEDIUM)
  except config_lib.ConfigError as e:
    print(f'shardlm: error: {e}', file=sys.stderr)
    sys.exit(2)
  root = Path(args.dir or tempfile.mkdtemp(prefix='shardlm_bench_ckpt_'))
  root.mkdir(parents=True, exist_ok=True)
  config_lib.override(cfg, 'train.run_dir', str(root / 'run'))
  config_lib.override(cfg, 'train.resume', 'none')
  try:
    results = bench(cfg, root, args.saves, args.steps)
  finally:
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)
  if args.out:
    Path(args.out).write_text(json.dumps(results, indent=2))


def bench(cfg, root: Path, saves: int, steps: int) -> dict:
  s = train.setup(cfg)
  B, T, m = cfg.data.batch_size, cfg.model.seq_len, s.rt.model_config
  tokens = jax.device_put(np.random.default_rng(0).integers(0, m.vocab_size, (B, T + 1), np.int32),
                          s.batch_sharding)
  state = s.init()
  step_fn = s.step.lower(state, tokens).compile()
  mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6
  n_params = sum(x.size for x in jax.tree.leaves(state['params']))
  print(f'model: {n_params:,} parameters, train state {mb:,.1f} MB; {jax.device_count()} '
        f'{jax.devices()[0].platform} device(s); writing under {root}', flush=True)

  disk = disk_write_mb_s(root, max(256, int(mb) // 8 * 8))
  print(f'disk: {disk:,.0f} MB/s sequential write, fsync\'d', flush=True)

  def one_step():
    nonlocal state
    state, metrics = step_fn(state, tokens)
    jax.block_until_ready(metrics)

  target = s.target()  # the train state on this mesh
  ckpt = checkpoint.Checkpoints(cfg, root / 'run', ByteTokenizer(), target)
  one_step()
  ckpt.save(int(state['step']), state)  # the first save also sets orbax up; not timed
  ckpt._manager.wait_until_finished()

  times = []
  for _ in range(steps):
    t = time.perf_counter()
    one_step()
    times.append(time.perf_counter() - t)
  base = statistics.median(times)
  print(f'step without a save: {base * 1e3:,.0f} ms (median of {steps})', flush=True)

  # Steps while a save runs: the interval of the step that calls save includes its blocking part.
  during, blocking, spans = [], [], []
  for _ in range(saves):
    step = int(state['step'])
    t = time.perf_counter()
    ckpt.save(step, state)
    blocking.append(time.perf_counter() - t)
    one_step()
    during.append(time.perf_counter() - t)
    n = 1
    while ckpt._manager.is_saving_in_progress():
      t = time.perf_counter()
      one_step()
      during.append(time.perf_counter() - t)
      n += 1
    spans.append(n)
  ratio = statistics.mean(during) / base
  print(f'step while a save runs: {statistics.mean(during) * 1e3:,.0f} ms (mean of {len(during)} '
        f'steps over {saves} saves, each overlapping {statistics.mean(spans):.1f} steps; save call '
        f'blocks {statistics.mean(blocking) * 1e3:,.0f} ms) = {ratio:.3f} x the step without',
        flush=True)

  # Save alone, call to commit; then restore into the mesh's shardings.
  save_s = []
  for _ in range(2):
    one_step()
    t = time.perf_counter()
    ckpt.save(int(state['step']), state)
    ckpt._manager.wait_until_finished()
    save_s.append(time.perf_counter() - t)
  last = ckpt.close()[-1]
  on_disk = sum(f.stat().st_size for f in (root / 'run' / 'checkpoints' / str(last)).rglob('*')
                if f.is_file()) / 1e6
  config_lib.override(cfg, 'train.resume', str(root / 'run' / 'checkpoints' / str(last)))
  restore_s = []
  for _ in range(2):
    t = time.perf_counter()
    restored, _, _ = checkpoint.Checkpoints(cfg, root / 'other', ByteTokenizer(), target).restore()
    jax.block_until_ready(restored)
    restore_s.append(time.perf_counter() - t)
    del restored
  save_rate, restore_rate = mb / min(save_s), mb / min(restore_s)
  print(f'save: {save_rate:,.0f} MB/s ({min(save_s):.2f} s, call to commit; {on_disk:,.1f} MB on '
        f'disk); restore: {restore_rate:,.0f} MB/s ({min(restore_s):.2f} s); disk: {disk:,.0f} MB/s',
        flush=True)
  return {'config': cfg.name, 'params': n_params, 'state_mb': mb, 'on_disk_mb': on_disk,
          'disk_write_mb_s': disk, 'step_s': base, 'step_during_save_s': statistics.mean(during),
          'ratio': ratio, 'save_blocking_s': statistics.mean(blocking),
          'steps_per_save': statistics.mean(spans), 'save_mb_s': save_rate,
          'restore_mb_s': restore_rate, 'device': jax.devices()[0].device_kind,
          'devices': jax.device_count()}


if __name__ == '__main__':
  main()
