"""Data pipeline throughput: the loader in tokens/s per process, preprocessing in MB/s of text.

  python scripts/bench_data.py                      # B=64, T=1024, byte and BPE, 1 and 2 workers
  python scripts/bench_data.py --steps 200 --workers 1 2 4 --mb 64

The corpus is the Python standard library written out as JSONL (one file per document), so the
benchmark needs no download. The BPE tokenizer is trained on part of it first (not timed).
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import jax

from shardlm.data import indexed, loader, preprocess, sources, tokenizer


def write_jsonl(out_dir: Path, megabytes: float, shards: int = 4) -> list[Path]:
  """The stdlib's .py files as JSONL shards, repeated until about `megabytes` of text."""
  files = [f for f in preprocess.stdlib_files() if f.stat().st_size]
  paths = [out_dir / f'corpus-{i}.jsonl' for i in range(shards)]
  handles = [p.open('w') for p in paths]
  written, n = 0, 0
  while written < megabytes * 1e6:
    for f in files:
      try:
        text = f.read_text('utf-8')
      except UnicodeDecodeError:
        continue
      handles[n % shards].write(json.dumps({'text': text}) + '\n')
      written, n = written + len(text.encode()), n + 1
      if written >= megabytes * 1e6:
        break
  for h in handles:
    h.close()
  return paths


def bench_preprocess(paths, tok_name: str, workers: int, out: Path) -> dict:
  corpus = sources.Corpus(paths)
  s = preprocess.preprocess(corpus, out, tok_name, workers)
  return {'tokenizer': tok_name if tok_name == 'byte' else 'bpe', 'workers': workers,
          'documents': s.documents, 'tokens': s.tokens, 'text_mb': s.text_bytes / 1e6,
          'seconds': s.seconds, 'mb_per_s': s.text_bytes / 1e6 / s.seconds,
          'docs_per_s': s.documents / s.seconds}


def bench_loader(prefix, B: int, T: int, steps: int, prefetch: int, blend: bool) -> dict:
  ds = indexed.IndexedDataset(prefix)
  streams = [ds.tokens] if not blend else [ds.tokens[:len(ds.tokens) // 2], ds.tokens[len(ds.tokens) // 2:]]
  batches = loader.Batches(streams, T, B, seed=0, weights=[0.7, 0.3] if blend else None,
                           prefetch=prefetch)
  mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.local_devices()[:1])
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data', None))
  batches.global_batch(0, sharding).block_until_ready()  # warm-up: first reads, thread start
  t0 = time.perf_counter()
  for step in range(1, steps + 1):
    x = batches.global_batch(step, sharding)
  x.block_until_ready()
  dt = time.perf_counter() - t0
  return {'B': B, 'T': T, 'blend': blend, 'prefetch': prefetch, 'steps': steps,
          'tokens_per_s': steps * B * T / dt, 'ms_per_batch': 1e3 * dt / steps}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--seq-len', type=int, default=1024)
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--mb', type=float, default=32, help='megabytes of JSONL text to preprocess')
  p.add_argument('--workers', type=int, nargs='+', default=[1, 2])
  p.add_argument('--bpe-vocab', type=int, default=8192)
  p.add_argument('--out', type=Path, help='also write the results here as JSON')
  args = p.parse_args()
  results = {'cpus': os.cpu_count(), 'loader': [], 'preprocess': []}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    paths = write_jsonl(tmp, args.mb)
    # Not timed: training the BPE on the first shard.
    tokenizer.train_bpe(sources.iter_texts(sources.Corpus(paths[:1])), args.bpe_vocab,
                        tmp / 'tokenizer.json')
    for tok_name in ('byte', str(tmp / 'tokenizer.json')):
      for w in args.workers:
        r = bench_preprocess(paths, tok_name, w, tmp / f'out-{w}')
        results['preprocess'].append(r)
        print(f"preprocess {r['tokenizer']:>4}, {w} worker(s): {r['mb_per_s']:6.1f} MB/s, "
              f"{r['docs_per_s']:8,.0f} docs/s ({r['text_mb']:.0f} MB, {r['tokens']:,} tokens, "
              f"{r['seconds']:.1f}s)", flush=True)
    prefix = tmp / f'out-{args.workers[0]}'  # the BPE dataset, written last
    for blend in (False, True):
      for prefetch in (0, 2):
        r = bench_loader(prefix, args.batch, args.seq_len, args.steps, prefetch, blend)
        results['loader'].append(r)
        print(f"loader B={r['B']} T={r['T']} {'blend 0.7/0.3' if blend else 'one dataset  '} "
              f"prefetch={prefetch}: {r['tokens_per_s'] / 1e6:6.2f}M tokens/s per process "
              f"({r['ms_per_batch']:.2f} ms per batch)", flush=True)
  if args.out:
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == '__main__':
  main()
