"""The default corpus and deterministic batches: the batch of step s is a pure function of (seed, s)."""
import functools
import os
import sysconfig
import zlib
from pathlib import Path

import jax
import numpy as np

from shardlm.config import ConfigError

_SKIP_DIRS = {'site-packages', 'dist-packages', '__pycache__'}


def stdlib_files() -> list[Path]:
  """The standard library's own .py files, in a fixed order; installed packages excluded."""
  root = Path(sysconfig.get_paths()['stdlib'])
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith('.py')]
  return files


def is_validation(path: Path, root: Path, fraction: float) -> bool:
  """A file's split depends only on its relative path, not on which other files exist."""
  key = path.relative_to(root).as_posix().encode()
  return zlib.crc32(key) % 10_000 < fraction * 10_000


def load_corpus(name: str, tokenizer, split: str, val_fraction: float) -> np.ndarray:
  """All documents of one split, tokenized and joined with end-of-document tokens."""
  if name != 'stdlib':
    raise ConfigError(f"data.corpus='{name}' is not available yet; use 'stdlib'")
  root = Path(sysconfig.get_paths()['stdlib'])
  eod = np.array([tokenizer.eod_id], np.uint16)
  parts = []
  for path in stdlib_files():
    if is_validation(path, root, val_fraction) == (split == 'validation'):
      parts += [tokenizer.encode(path.read_bytes()), eod]
  if not parts:
    raise ConfigError(f'the {split} split of corpus {name} is empty (data.val_fraction={val_fraction})')
  return np.concatenate(parts)


class Batches:
  """Fixed-length samples of T+1 tokens packed across documents, in a shuffled order.

  Sample i covers tokens [i*T, i*T + T + 1). Epoch e visits all samples in the order
  of a permutation seeded by (seed, e); global row j of step s is sample number
  s*B + j of that endless sequence. Nothing depends on what was read before.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
    self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
    self.num_samples = (len(tokens) - 1) // seq_len
    if self.num_samples < 1:
      raise ConfigError(f'corpus of {len(tokens)} tokens is shorter than one sample of '
                        f'{seq_len + 1} tokens (model.seq_len)')

  @functools.lru_cache(maxsize=2)
  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

  def rows(self, step: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the global batch of `step`, as int32 [rows, T+1]."""
    T = self.seq_len
    out = np.empty((stop - start, T + 1), np.int32)
    for r, j in enumerate(range(start, stop)):
      epoch, pos = divmod(step * self.batch_size + j, self.num_samples)
      i = self._order(epoch)[pos]
      out[r] = self.tokens[i * T:i * T + T + 1]
    return out

  def global_batch(self, step: int, sharding) -> jax.Array:
    """The step's [B, T+1] batch as one global array; each process reads only its own rows."""
    shape = (self.batch_size, self.seq_len + 1)
    rows = [idx[0].indices(shape[0]) for idx in sharding.addressable_devices_indices_map(shape).values()]
    start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
    return jax.make_array_from_process_local_data(sharding, self.rows(step, start, stop), shape)
