"""The indexed dataset: `<prefix>.bin` holds token ids, `<prefix>.idx` a header and document offsets.

`.idx` layout (little-endian): a 48-byte header
  magic b'SHLMIDX\\0' | version u32 | token bytes u32 (1, 2, 4) | vocab size u64 |
  documents u64 | tokens u64 | crc32 u32 (of the offsets, then of the header fields before it) | 4 pad
then documents+1 token offsets u64: document i is tokens [offsets[i], offsets[i+1]) of `.bin`,
its last token the end-of-document id. Both files are memory-mapped, never read whole.
"""
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from shardlm.errors import ConfigError

MAGIC, VERSION = b'SHLMIDX\x00', 1
HEADER = struct.Struct('<8sIIQQQI4x')
DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32}
_CHUNK = 1 << 22  # offsets checked per block, so opening never holds the whole index in memory


def token_dtype(vocab_size: int, name: str | None = None) -> np.dtype:
  """The smallest unsigned dtype holding every id below vocab_size, or the named one if it does."""
  if name is None:
    name = next(f'uint{8 * b}' for b in (1, 2, 4, 8) if vocab_size <= 256 ** b)
  dtype = np.dtype(name)
  if dtype.kind != 'u' or dtype.itemsize not in DTYPES:
    raise ConfigError(f"token dtype '{name}' is not one of uint8, uint16, uint32")
  if vocab_size > 256 ** dtype.itemsize:
    raise ConfigError(f'a vocabulary of {vocab_size:,} ids does not fit {name} (at most '
                      f'{256 ** dtype.itemsize:,} ids); use {token_dtype(vocab_size).name} or leave the '
                      'dtype out')
  return dtype


def paths(prefix) -> tuple[Path, Path]:
  prefix = str(prefix)
  for ext in ('.bin', '.idx'):  # accept the name of either file as the prefix
    if prefix.endswith(ext):
      prefix = prefix[:-len(ext)]
  return Path(prefix + '.bin'), Path(prefix + '.idx')


class Writer:
  """Appends documents under temporary names; `commit` renames them, so a crash leaves no pair."""

  def __init__(self, prefix, dtype, vocab_size: int):
    self.bin_path, self.idx_path = paths(prefix)
    self.bin_path.parent.mkdir(parents=True, exist_ok=True)
    tag = f'.tmp.{os.getpid()}'
    self.tmp_bin = self.bin_path.with_name(self.bin_path.name + tag)
    self.tmp_idx = self.idx_path.with_name(self.idx_path.name + tag)
    self.dtype, self.vocab_size = np.dtype(dtype), vocab_size
    self.num_docs = self.num_tokens = 0
    self._bin, self._idx = open(self.tmp_bin, 'wb'), open(self.tmp_idx, 'wb')
    self._idx.write(b'\0' * HEADER.size)
    self._crc = 0
    self._write_offsets(np.zeros(1, np.uint64))

  def _write_offsets(self, offsets):
    data = offsets.astype('<u8').tobytes()
    self._idx.write(data)
    self._crc = zlib.crc32(data, self._crc)

  def add(self, tokens: np.ndarray, lengths: np.ndarray):
    """Documents given as their tokens back to back (end-of-document included) and their lengths."""
    assert tokens.dtype == self.dtype and int(lengths.sum()) == len(tokens)
    self._bin.write(tokens.tobytes())
    self._write_offsets(self.num_tokens + np.cumsum(lengths, dtype=np.uint64))
    self.num_docs += len(lengths)
    self.num_tokens += len(tokens)

  def commit(self):
    fields = (MAGIC, VERSION, self.dtype.itemsize, self.vocab_size, self.num_docs, self.num_tokens)
    crc = zlib.crc32(HEADER.pack(*fields, 0)[:-8], self._crc)
    self._idx.seek(0)
    self._idx.write(HEADER.pack(*fields, crc))
    for f in (self._bin, self._idx):
      f.flush()
      os.fsync(f.fileno())
      f.close()
    # .idx goes last: an old .idx is removed first, so a .bin/.idx pair is only ever complete.
    self.idx_path.unlink(missing_ok=True)
    os.replace(self.tmp_bin, self.bin_path)
    os.replace(self.tmp_idx, self.idx_path)

  def discard(self):
    for f in (self._bin, self._idx):
      f.close()
    self.tmp_bin.unlink(missing_ok=True)
    self.tmp_idx.unlink(missing_ok=True)


class IndexedDataset:
  """Memory-mapped random access to documents and token ranges; checked when opened."""

  def __init__(self, prefix, verify: bool = True):
    bin_path, idx_path = paths(prefix)
    self.prefix = str(bin_path)[:-4]
    for p in (idx_path, bin_path):
      if not p.is_file():
        raise ConfigError(f'{p} not found: an indexed dataset is a .bin/.idx pair written by '
                          '`python -m shardlm.data.preprocess --output-prefix PREFIX`')
    idx_size = idx_path.stat().st_size

    def bad(why):
      return ConfigError(f'{idx_path} is not a valid index ({why}); run the preprocessing again')
    if idx_size < HEADER.size:
      raise bad(f'{idx_size} bytes, shorter than the {HEADER.size}-byte header')
    with open(idx_path, 'rb') as f:
      header = f.read(HEADER.size)
    magic, version, itemsize, vocab, docs, tokens, crc = HEADER.unpack(header)
    if magic != MAGIC:
      raise bad(f'magic {magic!r}, expected {MAGIC!r}')
    if version != VERSION:
      raise bad(f'format version {version}; this shardlm reads version {VERSION}')
    if itemsize not in DTYPES:
      raise bad(f'token size {itemsize} bytes, not 1, 2 or 4')
    if vocab > 256 ** itemsize:
      raise bad(f'a vocabulary of {vocab:,} ids does not fit {itemsize}-byte tokens')
    if docs < 1 or idx_size != HEADER.size + 8 * (docs + 1):
      raise bad(f'{idx_size} bytes for {docs:,} documents, expected {HEADER.size + 8 * (docs + 1):,}')
    self.dtype, self.vocab_size = np.dtype(DTYPES[itemsize]), vocab
    self.offsets = np.memmap(idx_path, '<u8', 'r', offset=HEADER.size, shape=(docs + 1,))
    if verify:
      self._verify(header, crc, tokens, bad)
    bin_size = bin_path.stat().st_size
    if bin_size != tokens * itemsize:
      raise ConfigError(f'{bin_path} holds {bin_size:,} bytes, but its index says {tokens:,} tokens '
                        f'of {itemsize} bytes ({tokens * itemsize:,}): the file is truncated or '
                        'not the one this index was written with; run the preprocessing again')
    self.tokens = np.memmap(bin_path, self.dtype, 'r', shape=(tokens,))

  def _verify(self, header, crc, tokens, bad):
    """Checksum, first and last offset, and offsets strictly increasing (no empty document)."""
    running, n = 0, len(self.offsets)
    for start in range(0, n, _CHUNK):
      block = np.asarray(self.offsets[start:start + _CHUNK + 1])
      running = zlib.crc32(block[:_CHUNK].tobytes(), running)
      if np.any(block[1:] <= block[:-1]):
        raise bad('document offsets are not increasing')
    if zlib.crc32(header[:-8], running) != crc:
      raise bad('checksum mismatch: the file was changed or damaged')
    if self.offsets[0] != 0 or self.offsets[-1] != tokens:
      raise bad(f'offsets run from {self.offsets[0]} to {self.offsets[-1]}, expected 0 to {tokens}')

  def __len__(self) -> int:
    return len(self.offsets) - 1

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)

  def __getitem__(self, i: int) -> np.ndarray:
    """Document i's tokens, its end-of-document token last (a view of the memory map)."""
    if not -len(self) <= i < len(self):
      raise IndexError(f'document {i} of {len(self)}')
    i %= len(self)
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]

  def token_range(self, start: int, stop: int) -> np.ndarray:
    return self.tokens[start:stop]
