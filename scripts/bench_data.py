"""Data pipeline throughput: the loader in tokens/s per process, preprocessing in MB/s of text.

  python scripts/bench_data.py                      # B=64, T=1024, byte and BPE, 1 and 2 workers
  python scripts/bench_data.py --steps 200 --workers 1 2 4 --mb 64 --repeats 3

The corpus is the Python standard library written out as JSONL (one file per document), so the
benchmark needs no download. The BPE tokenizer is trained on part of it first (not timed). The
reference is the tokenizers library's own `encode_batch` (and `encode_batch_fast`, which shardlm
calls) on the same documents, already in memory, timed in the same run: preprocessing with that
BPE, files read and written, is reported as a multiple of their rates. On a shared machine,
`--repeats` keeps the best of several interleaved runs of each.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

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
          'workers_ran': s.workers, 'documents': s.documents, 'tokens': s.tokens,
          'text_mb': s.text_bytes / 1e6, 'seconds': s.seconds, 'mb_per_s': s.text_bytes / 1e6 / s.seconds,
          'docs_per_s': s.documents / s.seconds}


def bench_library(texts: list[str], tok_path: Path, method: str) -> float:
  """Seconds for the tokenizers library's own `method` over every document at once."""
  from tokenizers import Tokenizer
  encode = getattr(Tokenizer.from_file(str(tok_path)), method)
  t0 = time.perf_counter()
  encode(texts, add_special_tokens=False)
  return time.perf_counter() - t0


REFERENCES = ('encode_batch', 'encode_batch_fast')  # the first is the goal's; shardlm calls the second


def bench_tokenizer(tok_name: str, paths, texts, workers: list[int], repeats: int, tmp: Path) -> list[dict]:
  """Preprocessing with each worker count, the best of `repeats`; for a BPE, beside the library's rate.

  The runs are interleaved, in turn, so that each sees the same load on a shared machine.
  """
  runs = {w: [] for w in workers}
  library = {m: [] for m in (REFERENCES if tok_name != 'byte' else ())}
  jobs = [(method, None) for method in library] + [(None, w) for w in workers]
  if tok_name == 'byte':  # a run takes a fraction of a second: more of them, to see past the noise
    repeats *= 5
  for i in range(repeats):
    for method, w in jobs[i % len(jobs):] + jobs[:i % len(jobs)]:  # each takes its turn first
      if method:
        library[method].append(bench_library(texts, Path(tok_name), method))
      else:
        runs[w].append(bench_preprocess(paths, tok_name, w, tmp / f'out-{w}'))
  rows = []
  for w in workers:
    r = min(runs[w], key=lambda r: r['seconds'])
    for method, seconds in library.items():
      r[f'{method}_mb_per_s'] = r['text_mb'] / min(seconds)
      r[f'of_{method}'] = min(seconds) / r['seconds']
    ran = '' if r['workers_ran'] == w else f" ({r['workers_ran']} ran)"
    print(f"preprocess {r['tokenizer']:>4}, {w} worker(s){ran}: {r['mb_per_s']:6.1f} MB/s, "
          f"{r['docs_per_s']:8,.0f} docs/s ({r['text_mb']:.0f} MB, {r['tokens']:,} tokens, "
          f"{r['seconds']:.1f}s)" + ''.join(f", {r[f'of_{m}']:.2f} x {m}" for m in library), flush=True)
    rows.append(r)
  for method, seconds in library.items():
    print(f"tokenizers {method}: {rows[0]['text_mb'] / min(seconds):6.1f} MB/s (the same "
          f"{len(texts):,} documents, already in memory; {min(seconds):.1f}s)", flush=True)
  return rows


def bench_loader(prefix, B: int, T: int, steps: int, prefetch: int, blend: bool) -> dict:
  # Imported here: preprocessing's worker processes import this script again, and need no JAX.
  import jax
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
  p.add_argument('--repeats', type=int, default=1, help='runs of each preprocessing row; the best is kept')
  p.add_argument('--out', type=Path, help='also write the results here as JSON')
  args = p.parse_args()
  results = {'cpus': os.cpu_count(), 'loader': [], 'preprocess': []}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    paths = write_jsonl(tmp, args.mb)
    # Not timed: training the BPE on the first shard, and reading the documents for the reference.
    bpe = tmp / 'tokenizer.json'
    tokenizer.train_bpe(sources.iter_texts(sources.Corpus(paths[:1])), args.bpe_vocab, bpe)
    texts = list(sources.iter_texts(sources.Corpus(paths)))
    for tok_name in ('byte', str(bpe)):
      results['preprocess'] += bench_tokenizer(tok_name, paths, texts, args.workers, args.repeats, tmp)
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
