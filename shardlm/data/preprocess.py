"""`python -m shardlm.data.preprocess`: text / JSONL (plain, gzip, zstd) -> an indexed dataset.

  python -m shardlm.data.preprocess --input 'corpus/*.jsonl' --json-key text \\
      --tokenizer tokenizer.json --output-prefix data/mycorpus --workers 8

writes data/mycorpus.bin and data/mycorpus.idx, one document per JSON line (or text file), each
ending in the end-of-document token. Workers tokenize chunks in parallel but results are written
in input order, so the output is byte-identical for any number of workers.
"""
import argparse
import collections
import dataclasses
import hashlib
import multiprocessing
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from shardlm.config import ConfigError
from shardlm.data import indexed, sources, tokenizer as tokenizer_lib

_SKIP_DIRS = {'site-packages', 'dist-packages', '__pycache__'}
_worker = {}  # per process: the tokenizer and token dtype, set by _init


@dataclasses.dataclass
class Summary:
  documents: int
  tokens: int
  skipped: int
  text_bytes: int
  seconds: float
  dtype: str


def _init(tokenizer_name: str, dtype: str, in_pool: bool):
  if in_pool:
    # Ctrl-C is the parent's to handle; one tokenizer thread per worker process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'
  tok = tokenizer_lib.get_tokenizer(tokenizer_name)
  _worker.update(tok=tok, dtype=np.dtype(dtype), eod=np.array([tok.eod_id], dtype))


def _encode(chunk: sources.Chunk):
  """(chunk, tokens back to back with end-of-document tokens, lengths, bad documents, text bytes).

  The chunk comes back without its documents: the parent needs only where it was.
  """
  tok, dtype, eod = _worker['tok'], _worker['dtype'], _worker['eod']
  texts, bad = sources.parse(chunk)
  ids = tok.encode_batch(texts) if texts else []
  tokens = np.concatenate([p for a in ids for p in (a, eod)]) if ids else np.zeros(0, dtype)
  if len(tokens) and tokens.max() >= tok.vocab_size:  # a tokenizer bug: never wrap it into the dtype
    raise ConfigError(f'{chunk.path}: tokenizer {tok.name} produced id {tokens.max()} >= its '
                      f'vocabulary size {tok.vocab_size}')
  tokens = tokens.astype(dtype, copy=False)
  lengths = np.array([len(a) + 1 for a in ids], np.uint64)
  nbytes = sum(len(r) for r in chunk.items)
  return dataclasses.replace(chunk, lines=[], items=[]), tokens, lengths, bad, nbytes


def _ordered_map(items, workers: int, initargs):
  """_encode over items on `workers` processes, results in input order, a bounded number in flight."""
  if workers == 1:
    _init(*initargs, in_pool=False)
    yield from map(_encode, items)
    return
  # spawn, not fork: the parent may hold JAX or tokenizer threads that a fork would break.
  ctx = multiprocessing.get_context('spawn')
  with ctx.Pool(workers, _init, (*initargs, True)) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.apply_async(_encode, (item,)))
      if len(pending) >= 4 * workers:
        yield pending.popleft().get()
    while pending:
      yield pending.popleft().get()


class _Progress:
  """A bar over on-disk input bytes with documents/s and MB/s (of text); quiet when off."""

  def __init__(self, total_bytes: int, enabled: bool):
    self.bar = None
    if enabled:
      from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
      self.bar = Progress(TextColumn('preprocess'), BarColumn(), TextColumn('{task.percentage:>3.0f}%'),
                          TextColumn('{task.fields[rate]}'), TimeRemainingColumn(),
                          transient=True)  # the summary line replaces it
      self.task = self.bar.add_task('', total=total_bytes, rate='')
      self.bar.start()
    self.t0 = time.perf_counter()

  def update(self, disk_pos, docs, text_bytes):
    if self.bar:
      dt = max(time.perf_counter() - self.t0, 1e-9)
      self.bar.update(self.task, completed=disk_pos,
                      rate=f'{docs:,} docs | {docs / dt:,.0f} docs/s | {text_bytes / dt / 1e6:,.1f} MB/s')

  def stop(self):
    if self.bar:
      self.bar.stop()


def preprocess(corpus: sources.Corpus, output_prefix, tokenizer_name: str = 'byte', workers: int = 1,
               dtype: str | None = None, progress: bool = False) -> Summary:
  """Tokenizes `corpus` into `<output_prefix>.bin/.idx`; nothing is left behind on an error."""
  if workers < 1:
    raise ConfigError(f'--workers {workers} must be at least 1')
  tok = tokenizer_lib.get_tokenizer(tokenizer_name)
  dtype = indexed.token_dtype(tok.vocab_size, dtype)
  total = sum(p.stat().st_size for p in corpus.paths)
  t0 = time.perf_counter()
  writer = indexed.Writer(output_prefix, dtype, tok.vocab_size)
  bar = _Progress(total, progress)
  skipped = text_bytes = 0
  results = _ordered_map(sources.chunks(corpus), workers, (tokenizer_name, dtype.name))
  try:
    for chunk, tokens, lengths, bad, nbytes in results:
      if bad and not corpus.skip_bad:
        raise sources.bad_document(chunk.path, *bad[0])
      skipped += len(bad)
      text_bytes += nbytes
      writer.add(tokens, lengths)
      bar.update(chunk.disk_pos, writer.num_docs, text_bytes)
    if writer.num_docs == 0:
      raise sources.empty_corpus(corpus)
    writer.commit()
  except BaseException:
    writer.discard()
    raise
  finally:
    results.close()  # stops the worker pool at once on an error
    bar.stop()
  return Summary(writer.num_docs, writer.num_tokens, skipped, text_bytes, time.perf_counter() - t0,
                 dtype.name)


def stdlib_files() -> list[Path]:
  """The standard library's own .py files, in a fixed order; installed packages excluded."""
  root = Path(sysconfig.get_paths()['stdlib'])
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith('.py')]
  return files


def cache_dir() -> Path:
  return Path(os.environ.get('SHARDLM_CACHE') or Path.home() / '.cache' / 'shardlm')


def stdlib_dataset(tokenizer_name: str = 'byte') -> Path:
  """The prefix of the standard library preprocessed with the tokenizer, built on first use.

  Each file is one document (the few that are not UTF-8 are skipped). The cache is built in a
  temporary folder renamed into place, so processes building it at once never see half of one.
  """
  tok = tokenizer_lib.get_tokenizer(tokenizer_name)
  files = stdlib_files()
  key = hashlib.sha256(repr((indexed.VERSION, sys.version, str(files[0].parent) if files else '',
                             len(files), sum(f.stat().st_size for f in files),
                             tok.fingerprint)).encode()).hexdigest()[:16]
  final = cache_dir() / f'stdlib-{key}'
  if (final / 'stdlib.idx').is_file():
    return final / 'stdlib'
  tmp = None
  try:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{final.name}-', dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would keep the cache from other users
    corpus = sources.Corpus(files, fmt='text', text_docs='file', skip_bad=True)
    preprocess(corpus, tmp / 'stdlib', tokenizer_name)
    try:
      os.rename(tmp, final)
    except OSError:
      if not (final / 'stdlib.idx').is_file():  # else another process finished first: use its copy
        raise
  except OSError as e:
    raise ConfigError(f'cannot build the standard-library corpus in {final.parent}: {e.strerror}; '
                      'set SHARDLM_CACHE to a writable folder') from None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  return final / 'stdlib'


def main(argv=None):
  p = argparse.ArgumentParser(prog='python -m shardlm.data.preprocess',
                              description='Tokenize text / JSONL files into an indexed dataset '
                                          '(<prefix>.bin + <prefix>.idx).')
  sources.add_input_args(p)
  p.add_argument('--tokenizer', default='byte',
                 help="'byte', a tokenizer.json (or its folder) or a sentencepiece .model")
  p.add_argument('--output-prefix', required=True, help='writes PREFIX.bin and PREFIX.idx')
  p.add_argument('--workers', type=int, default=1, help='tokenizer processes')
  p.add_argument('--dtype', choices=('uint8', 'uint16', 'uint32'),
                 help='token dtype; default: the smallest that holds the vocabulary')
  p.add_argument('--no-progress', action='store_true', help='no progress bar')
  args = p.parse_args(argv)
  try:
    s = preprocess(sources.from_args(args), args.output_prefix, args.tokenizer, args.workers,
                   args.dtype, progress=not args.no_progress)
  except ConfigError as e:
    print(f'shardlm: error: {e}', file=sys.stderr)
    sys.exit(2)
  except OSError as e:
    print(f'shardlm: error: {e.filename or args.output_prefix}: {e.strerror}; nothing written',
          file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print('shardlm: error: interrupted; nothing written', file=sys.stderr)
    sys.exit(130)
  bin_path, idx_path = indexed.paths(args.output_prefix)
  print(f'wrote {bin_path} and {idx_path.name}: {s.documents:,} documents, {s.tokens:,} tokens '
        f'({s.dtype}), {s.skipped:,} skipped; {s.text_bytes / 1e6:,.1f} MB of text in {s.seconds:.1f}s '
        f'= {s.text_bytes / 1e6 / s.seconds:,.1f} MB/s, {s.documents / s.seconds:,.0f} docs/s '
        f'with {args.workers} worker(s)')


if __name__ == '__main__':
  main()
