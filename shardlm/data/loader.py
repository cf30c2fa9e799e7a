"""Step-indexed global batches: the batch of step s is a pure function of (seed, s).

A dataset split is one stream of tokens (its documents back to back, each ending in the
end-of-document token). Sample i of a stream is tokens [i*T, i*T + T + 1): samples are packed
across document boundaries and found by arithmetic, so there is no sample index to build or store.
Each stream's samples are visited in a permutation per epoch seeded by (seed, epoch), computed
index by index (grain's index_shuffle), never materialized. Several streams are blended by a
deterministic weighted interleave (grain's mix), so which stream global sample j comes from is a
pure function of j. Global row r of step s is global sample s*B + r; each process reads only
the rows its devices hold.
"""
import concurrent.futures
import dataclasses
import functools
import threading

import grain
import jax
import numpy as np

from shardlm.errors import ConfigError
from shardlm.data import indexed, preprocess
from shardlm.data.preprocess import stdlib_files  # noqa: F401  (part of the public surface)

SPLITS = ('train', 'validation', 'test')
BUILTIN = ('stdlib',)


def split_fractions(spec: str) -> tuple[float, float, float]:
  """Megatron's data.split: '969,30,1' -> train, validation, test shares of the documents."""
  try:
    parts = [float(p) for p in spec.replace('/', ',').split(',')]
  except ValueError:
    parts = []
  if not 1 <= len(parts) <= 3 or any(p < 0 or p != p for p in parts) or sum(parts) <= 0:
    raise ConfigError(f"data.split='{spec}' is not a split; give train,validation,test shares "
                      "of the documents, e.g. '969,30,1'")
  parts += [0.0] * (3 - len(parts))
  return tuple(p / sum(parts) for p in parts)


def split_ranges(num_docs: int, fractions) -> list[tuple[int, int]]:
  """Document ranges of the three splits, rounded as Megatron-LM rounds them."""
  bounds = [0]
  for f in fractions:
    bounds.append(bounds[-1] + int(round(f * num_docs)))
  diff = bounds[-1] - num_docs
  bounds = [0] + [b - diff for b in bounds[1:]]
  return [(max(a, 0), max(b, 0)) for a, b in zip(bounds, bounds[1:])]


def check_config(data) -> None:
  """The data keys that can be checked without reading any file."""
  split_fractions(data.split)
  if not data.paths and data.corpus not in BUILTIN:
    raise ConfigError(f"data.corpus='{data.corpus}' is not a built-in corpus ({', '.join(BUILTIN)}); "
                      "to train on your own files set data.paths to preprocessed prefixes")
  if not all(isinstance(p, str) and p for p in data.paths):
    raise ConfigError(f'data.paths={data.paths!r} must be a tuple of dataset prefixes '
                      "(strings), e.g. ('data/mycorpus',)")
  if data.weights:
    if len(data.weights) != len(data.paths):
      raise ConfigError(f'data.weights has {len(data.weights)} entries but data.paths has '
                        f'{len(data.paths)}; give one weight per path, or none')
    if not all(isinstance(w, (int, float)) and w > 0 for w in data.weights):
      raise ConfigError(f'data.weights={data.weights!r} must be positive numbers')
  if data.prefetch < 0:
    raise ConfigError(f'data.prefetch={data.prefetch} must be >= 0 (0: no background prefetch)')


def _tag(k: int, i: int) -> tuple[int, int]:
  return k, int(i)


def _seed(seed: int, k: int) -> int:
  return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])  # grain wants 32 bits


def local_rows(sharding, shape) -> tuple[int, int]:
  """[start, stop): the rows of a global batch of `shape` this process's devices hold."""
  rows = [idx[0].indices(shape[0]) for idx in sharding.addressable_devices_indices_map(shape).values()]
  return min(r[0] for r in rows), max(r[1] for r in rows)


class Batches:
  """Global batches of [B, T+1] int32 tokens from one token stream or a weighted blend of several.

  Args:
    streams: a 1-D token array (a memory map is never read whole), or a list of them.
    seq_len, batch_size: T and B.
    seed: the order of samples is a pure function of (seed, epoch) for each stream.
    weights: blending weights, one per stream (default: their sizes).
    prefetch: batches built ahead in a background thread when steps are asked for in order.
  """

  def __init__(self, streams, seq_len: int, batch_size: int, seed: int, weights=None,
               prefetch: int = 0, names=None):
    self.streams = [streams] if isinstance(streams, np.ndarray) else list(streams)
    self.seq_len, self.batch_size, self.seed, self.prefetch = seq_len, batch_size, seed, prefetch
    names = names or [f'stream {k}' for k in range(len(self.streams))]
    self.num_samples = [(len(t) - 1) // seq_len for t in self.streams]
    for name, t, n in zip(names, self.streams, self.num_samples):
      if n < 1:
        raise ConfigError(f'{name} holds {len(t):,} tokens, fewer than one sample of {seq_len + 1} '
                          '(model.seq_len + 1)')
      if n > 2 ** 32:
        raise ConfigError(f'{name} holds {n:,} samples, more than 2^32; split it into several paths')
    self.weights = tuple(float(w) for w in (weights or self.num_samples))
    # Each element of the order is (stream, sample within it): tagged per stream, then mixed.
    orders = [grain.MapDataset.range(n).shuffle(seed=_seed(seed, k)).map(functools.partial(_tag, k))
              for k, n in enumerate(self.num_samples)]
    self._order = orders[0] if len(orders) == 1 else grain.MapDataset.mix(orders, self.weights)
    self._lock = threading.Lock()  # grain's datasets keep statistics that are not thread-safe
    self._pool, self._pending = None, {}

  def locate(self, j: int) -> tuple[int, int]:
    """(stream, sample within it) of global sample j."""
    with self._lock:
      return self._order[j]

  def sample(self, j: int) -> np.ndarray:
    k, i = self.locate(j)
    T = self.seq_len
    return self.streams[k][i * T:i * T + T + 1]

  def rows(self, step: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the global batch of `step`, as int32 [rows, T+1]."""
    out = np.empty((stop - start, self.seq_len + 1), np.int32)
    first = step * self.batch_size
    for r in range(stop - start):
      out[r] = self.sample(first + start + r)
    return out

  def _local_rows(self, step: int, start: int, stop: int) -> np.ndarray:
    if not self.prefetch:
      return self.rows(step, start, stop)
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='shardlm-prefetch')
    future = self._pending.pop((step, start, stop), None)
    for key in [k for k in self._pending if not step < k[0] <= step + self.prefetch]:
      self._pending.pop(key).cancel()
    for s in range(step + 1, step + 1 + self.prefetch):
      if (s, start, stop) not in self._pending:
        self._pending[s, start, stop] = self._pool.submit(self.rows, s, start, stop)
    return future.result() if future else self.rows(step, start, stop)

  def global_batch(self, step: int, sharding) -> jax.Array:
    """The step's [B, T+1] batch as one global array; each process reads only its own rows."""
    shape = (self.batch_size, self.seq_len + 1)
    start, stop = local_rows(sharding, shape)
    return jax.make_array_from_process_local_data(sharding, self._local_rows(step, start, stop), shape)


@dataclasses.dataclass
class Data:
  train: Batches
  validation: Batches
  test: Batches | None
  summary: str


def from_config(data, tokenizer, seq_len: int, batch_size: int) -> Data:
  """Opens (or, for the built-in corpus, builds once into the cache) every dataset and splits it."""
  check_config(data)
  names = list(data.paths) or [data.corpus]
  prefixes = [preprocess.stdlib_dataset(data.tokenizer) if n in BUILTIN else n for n in names]
  datasets = [indexed.IndexedDataset(p) for p in prefixes]
  for name, ds in zip(names, datasets):
    if ds.vocab_size != tokenizer.vocab_size:
      raise ConfigError(f'dataset {name} was made with a vocabulary of {ds.vocab_size:,} ids, but '
                        f"data.tokenizer='{data.tokenizer}' has {tokenizer.vocab_size:,}; set "
                        'data.tokenizer to the tokenizer it was preprocessed with')
  fractions = split_fractions(data.split)
  out, tokens = {}, {}
  for i, split in enumerate(SPLITS):
    streams, labels = [], []
    for name, ds in zip(names, datasets):
      a, b = split_ranges(len(ds), fractions)[i]
      streams.append(ds.tokens[int(ds.offsets[a]):int(ds.offsets[b])])
      labels.append(f"the {split} split of {name} (documents {a:,}-{b:,} of {len(ds):,}, "
                    f"data.split='{data.split}')")
    tokens[split] = sum(len(t) for t in streams)
    if split == 'test' and any(len(t) <= seq_len for t in streams):
      out[split] = None  # optional: only evaluation reads it
      continue
    out[split] = Batches(streams, seq_len, batch_size, data.seed + i, data.weights or None,
                         data.prefetch, labels)
  w = out['train'].weights
  blend = ' + '.join(f'{x / sum(w):.3g} x {n}' for x, n in zip(w, names)) if len(names) > 1 else names[0]
  summary = (f"{blend} ({tokenizer.name} tokens), {tokens['train']:,} train / "
             f"{tokens['validation']:,} validation / {tokens['test']:,} test tokens")
  return Data(out['train'], out['validation'], out['test'], summary)
