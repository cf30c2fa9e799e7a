"""`python -m shardlm.data.preprocess`: text / JSONL (plain, gzip, zstd) -> an indexed dataset.

  python -m shardlm.data.preprocess --input 'corpus/*.jsonl' --json-key text \\
      --tokenizer tokenizer.json --output-prefix data/mycorpus --workers 8

writes data/mycorpus.bin and data/mycorpus.idx, one document per JSON line (or text file), each
ending in the end-of-document token. Workers tokenize chunks in parallel but results are written
in input order, so the output is byte-identical for any number of workers.
"""
import collections
import concurrent.futures
import contextlib
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

from shardlm import errors
from shardlm.data import indexed, sources
from shardlm.data import tokenizer as tokenizer_lib
from shardlm.errors import ConfigError

_SKIP_DIRS = {'site-packages', 'dist-packages', '__pycache__'}
_worker = {}  # per process: the tokenizer and token dtype, set by _init
_MAX_WORKERS_PER_CPU = 4  # more tokenizer processes than this is a typo, not a speed-up
_PROBE_SECONDS = 2.0  # the parent works alone this long before worker processes may start


@dataclasses.dataclass
class Summary:
  documents: int
  tokens: int
  skipped: int
  text_bytes: int
  seconds: float
  dtype: str
  workers: int  # tokenizer processes that ran: 1 unless more were asked for and could help


def _init(tokenizer_name: str, dtype: str, threads: int = 0, ready=None):
  """Loads the tokenizer; in a worker process (`ready` given), with `threads` tokenizer threads."""
  if ready is not None:
    # Ctrl-C is the parent's to handle. The tokenizers library sizes its thread pool on first use,
    # so this process's share of the cores is set before anything is encoded.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ['TOKENIZERS_PARALLELISM'] = 'true' if threads > 1 else 'false'
    os.environ['RAYON_NUM_THREADS'] = str(threads)
  tok = tokenizer_lib.get_tokenizer(tokenizer_name)
  _worker.update(tok=tok, dtype=np.dtype(dtype), eod=np.array([tok.eod_id], dtype))
  if ready is not None:
    with ready.get_lock():
      ready.value += 1


def _encode(chunk: sources.Chunk):
  """(chunk, tokens back to back with end-of-document tokens, lengths, bad documents, text bytes).

  The chunk comes back without its documents: the parent needs only where it was.
  """
  tok, dtype, eod = _worker['tok'], _worker['dtype'], _worker['eod']
  texts, bad = sources.parse(chunk)
  if isinstance(tok, tokenizer_lib.ByteTokenizer):
    # Its ids are the UTF-8 bytes: one array for the chunk, not one per document.
    data = [t.encode('utf-8') for t in texts]
    ends = np.cumsum([len(b) for b in data], dtype=np.int64)
    tokens = np.insert(np.frombuffer(b''.join(data), np.uint8).astype(dtype), ends, eod)
    lengths = np.diff(ends, prepend=0).astype(np.uint64) + 1
  else:
    ids = tok.encode_batch(texts) if texts else []
    tokens = np.concatenate([p for a in ids for p in (a, eod)]) if ids else np.zeros(0, dtype)
    lengths = np.array([len(a) + 1 for a in ids], np.uint64)
  if len(tokens) and tokens.max() >= tok.vocab_size:  # a tokenizer bug: never wrap it into the dtype
    raise ConfigError(f'{chunk.path}: tokenizer {tok.name} produced id {tokens.max()} >= its '
                      f'vocabulary size {tok.vocab_size}')
  tokens = tokens.astype(dtype, copy=False)
  nbytes = sum(len(r) for r in chunk.items)
  return dataclasses.replace(chunk, lines=[], items=[]), tokens, lengths, bad, nbytes


def _idle_cpus(t0: float, cpu0: float) -> float:
  """Cores that neither this process (since `t0`, `cpu0`) nor others (the 1-minute load) keep busy."""
  busy = (time.process_time() - cpu0) / max(time.perf_counter() - t0, 1e-9)
  with contextlib.suppress(AttributeError, OSError):  # no load average on Windows
    busy = max(busy, os.getloadavg()[0])
  return sources.cpu_count() - busy


def _start_pool(stack: contextlib.ExitStack, workers: int, initargs):
  """(a pool of `workers` tokenizer processes, the count of those ready); `stack` stops the pool."""
  # spawn, not fork: the parent may hold JAX or tokenizer threads that a fork would break.
  ctx = multiprocessing.get_context('spawn')
  ready = ctx.Value('i', 0)
  threads = max(1, sources.cpu_count() // workers)
  return stack.enter_context(ctx.Pool(workers, _init, (*initargs, threads, ready))), ready


@contextlib.contextmanager
def _library_threads_off():
  """While this lasts, the tokenizers library encodes a batch in the calling thread alone."""
  # The library reads the variable at each call; the previous setting comes back after.
  before = os.environ.get('TOKENIZERS_PARALLELISM')
  os.environ['TOKENIZERS_PARALLELISM'] = 'false'
  try:
    yield
  finally:
    if before is None:
      os.environ.pop('TOKENIZERS_PARALLELISM', None)
    else:
      os.environ['TOKENIZERS_PARALLELISM'] = before


def _ordered_map(items, workers: int, initargs, ran: list):
  """_encode over items, results in input order, a bounded number of chunks in flight.

  The byte tokenizer runs inline: handing a chunk to a thread or a process costs more than
  tokenizing it. Other tokenizers release the GIL, so the parent encodes one chunk per CPU at
  once, each in a thread of its own with the library's own threads off: whole chunks keep the
  cores busy with no hand-offs between threads, which slow the library's thread pool on a busy
  machine. Worker processes (workers > 1) take the parsing off the parent too, which pays once
  many cores outrun the one Python thread that parses, and only then: they start only if, after
  the parent has worked alone for a while, a core is still idle, and the parent goes on alone
  until the first is ready. So more workers are never slower than one. At the end, `ran` gets
  the number of processes that tokenized: the workers if they took any chunk, else 1.
  """
  _init(*initargs)
  if initargs[0] == 'byte':
    yield from map(_encode, items)
    ran.append(1)
    return
  threads = sources.cpu_count()
  t0, cpu0 = time.perf_counter(), time.process_time()
  with contextlib.ExitStack() as stack:
    stack.enter_context(_library_threads_off())
    local = stack.enter_context(concurrent.futures.ThreadPoolExecutor(threads, 'shardlm-tokenize'))
    stack.callback(local.shutdown, cancel_futures=True)  # on an error, drop what has not started
    pool = ready = None
    to_pool = 0
    pending = collections.deque()  # each entry gives its result when called
    for item in items:
      if (workers > 1 and pool is None and time.perf_counter() - t0 > _PROBE_SECONDS
          and _idle_cpus(t0, cpu0) >= 1):
        pool, ready = _start_pool(stack, workers, initargs)
      if ready is not None and ready.value:
        pending.append(pool.apply_async(_encode, (item,)).get)
        to_pool += 1
      else:
        pending.append(local.submit(_encode, item).result)
      if len(pending) > max(threads, 2 * workers):
        yield pending.popleft()()
    while pending:
      yield pending.popleft()()
  ran.append(workers if to_pool else 1)


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


@dataclasses.dataclass
class Plan:
  """A checked preprocessing run: nothing is created until `run`."""
  corpus: sources.Corpus
  output_prefix: str
  tokenizer_name: str
  vocab_size: int
  dtype: np.dtype
  workers: int
  empty: list[Path]  # input files that are empty


def plan(corpus: sources.Corpus, output_prefix, tokenizer_name: str = 'byte', workers: int = 1,
         dtype: str | None = None) -> Plan:
  """Checks every input (tokenizer, dtype, files, output) and creates nothing."""
  if workers < 1:
    raise ConfigError(f'--workers {workers} must be at least 1')
  cpus = sources.cpu_count()
  if workers > _MAX_WORKERS_PER_CPU * cpus:  # each is a process with its own tokenizer
    raise ConfigError(f'--workers {workers} is more than {_MAX_WORKERS_PER_CPU} per CPU ({cpus} here): '
                      f'give at most {_MAX_WORKERS_PER_CPU * cpus}')
  tok = tokenizer_lib.get_tokenizer(tokenizer_name)
  token_dtype = indexed.token_dtype(tok.vocab_size, dtype)
  empty = sources.check_inputs(corpus)
  bin_path, idx_path = indexed.paths(output_prefix)
  if bin_path.name == '.bin' or str(output_prefix).endswith(('/', os.sep)):
    raise ConfigError(f"--output-prefix '{output_prefix}' names no file; give a prefix such as "
                      f"'{bin_path.parent / 'corpus'}' (for corpus.bin and corpus.idx)")
  for path in (bin_path, idx_path):
    sources.check_output(path, '--output-prefix', corpus.paths)
  return Plan(corpus, str(output_prefix), tokenizer_name, tok.vocab_size, token_dtype, workers, empty)


def run(job: Plan, progress: bool = False) -> Summary:
  """Writes `job`'s `.bin/.idx`; on any error, nothing is left behind (no file, no new folder)."""
  corpus, dtype = job.corpus, job.dtype
  total = sum(p.stat().st_size for p in corpus.paths)
  t0 = time.perf_counter()
  new_dirs = sources.missing_dirs(indexed.paths(job.output_prefix)[0])
  writer = None
  skipped = text_bytes = 0
  try:
    writer = indexed.Writer(job.output_prefix, dtype, job.vocab_size)
    bar = _Progress(total, progress)
    ran = []
    results = _ordered_map(sources.chunks(corpus), job.workers, (job.tokenizer_name, dtype.name), ran)
    try:
      for chunk, tokens, lengths, bad, nbytes in results:
        if bad and not corpus.skip_bad:
          raise sources.bad_document(chunk.path, *bad[0])
        skipped += len(bad)
        text_bytes += nbytes
        writer.add(tokens, lengths)
        bar.update(chunk.disk_pos, writer.num_docs, text_bytes)
    finally:
      results.close()  # stops the worker pool at once on an error
      bar.stop()
    if writer.num_docs == 0:
      raise sources.empty_corpus(corpus)
    writer.commit()
  except BaseException:
    if writer is not None:
      writer.discard()
    sources.remove_dirs(new_dirs)
    raise
  return Summary(writer.num_docs, writer.num_tokens, skipped, text_bytes, time.perf_counter() - t0,
                 dtype.name, ran[0])


def preprocess(corpus: sources.Corpus, output_prefix, tokenizer_name: str = 'byte', workers: int = 1,
               dtype: str | None = None, progress: bool = False) -> Summary:
  """Tokenizes `corpus` into `<output_prefix>.bin/.idx`; nothing is left behind on an error."""
  return run(plan(corpus, output_prefix, tokenizer_name, workers, dtype), progress)


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


def _main(argv):
  p = errors.ArgumentParser(prog='python -m shardlm.data.preprocess',
                            description='Tokenize text / JSONL files into an indexed dataset '
                                        '(<prefix>.bin + <prefix>.idx).')
  sources.add_input_args(p)
  p.add_argument('--tokenizer', default='byte',
                 help="'byte', a tokenizer.json (or its folder) or a sentencepiece .model")
  p.add_argument('--output-prefix', required=True, help='writes PREFIX.bin and PREFIX.idx')
  p.add_argument('--workers', type=int, default=1,
                 help='tokenizer processes, started only while one process leaves a core idle '
                      '(never for the byte tokenizer: it is faster in one)')
  p.add_argument('--dtype', choices=('uint8', 'uint16', 'uint32'),
                 help='token dtype; default: the smallest that holds the vocabulary')
  p.add_argument('--no-progress', action='store_true', help='no progress bar')
  args = p.parse_args(argv)
  # Every input is checked before anything is written, and before any warning.
  corpus = sources.from_args(args)
  job = plan(corpus, args.output_prefix, args.tokenizer, args.workers, args.dtype)
  sources.warn_inputs(corpus, job.empty)
  if args.workers > sources.cpu_count():
    errors.warn(f'--workers {args.workers} is more than the {sources.cpu_count()} CPUs here; the extra '
                'processes only add memory')
  bin_path, idx_path = indexed.paths(args.output_prefix)
  if Path(str(bin_path)[:-len('.bin')]).is_dir():
    errors.warn(f"--output-prefix '{args.output_prefix}' is a folder: {bin_path.name} and "
                f'{idx_path.name} are written beside it, not in it')
  existing = [p.name for p in (bin_path, idx_path) if p.exists()]
  if existing:
    errors.warn(f"{' and '.join(existing)} in {bin_path.parent} already exist; they are replaced "
                'once the new files are complete')
  try:
    s = run(job, progress=not args.no_progress)
  except OSError as e:
    raise ConfigError(f'{e.filename or args.output_prefix}: {e.strerror}; nothing written') from None
  except KeyboardInterrupt:
    print('shardlm: error: interrupted; nothing written', file=sys.stderr, flush=True)
    sys.exit(130)
  print(f'wrote {bin_path} and {idx_path.name}: {s.documents:,} documents, {s.tokens:,} tokens '
        f'({s.dtype}), {s.skipped:,} skipped; {s.text_bytes / 1e6:,.1f} MB of text in {s.seconds:.1f}s '
        f'= {s.text_bytes / 1e6 / s.seconds:,.1f} MB/s, {s.documents / s.seconds:,.0f} docs/s '
        f'with {s.workers} worker(s)' + ('' if s.workers == args.workers else
                                         f' of {args.workers}: more would not have been faster'))


def main(argv=None):
  """The CLI: bad input of any kind is one `shardlm: error:` line and exit status 2."""
  errors.run_cli(_main, argv)


if __name__ == '__main__':
  main()
