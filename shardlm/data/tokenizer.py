"""The byte tokenizer: ids 0-255 are bytes, 256 ends a document. Needs no files."""
import numpy as np

from shardlm.config import ConfigError


class ByteTokenizer:
  vocab_size = 257
  eod_id = 256
  name = 'byte'

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode('utf-8') if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return bytes(ids[ids < 256].astype(np.uint8)).decode('utf-8', errors='replace')


def get_tokenizer(name: str):
  if name == 'byte':
    return ByteTokenizer()
  raise ConfigError(f"data.tokenizer='{name}' is not available; valid: byte")
