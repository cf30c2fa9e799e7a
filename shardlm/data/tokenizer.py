"""Tokenizers: bytes (the default, no files), Hugging Face `tokenizer.json`, sentencepiece `.model`.

`python -m shardlm.data.tokenizer train --input 'corpus/*.jsonl' --vocab-size 32000 --out tokenizer.json`
trains a GPT-2-style byte-level BPE on a corpus.
"""
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from shardlm import errors
from shardlm.data import sources
from shardlm.errors import ConfigError

# Names a tokenizer file may give its end-of-document token, in order of preference. BERT
# vocabularies have none, and [SEP] ends a document there, as in Megatron's BERT data.
EOD_NAMES = ('<|endoftext|>', '<|end_of_text|>', '</s>', '<eos>', '<eod>', '[SEP]')
BERT_NAMES = {'cls': '[CLS]', 'sep': '[SEP]', 'mask': '[MASK]', 'pad': '[PAD]'}


class ByteTokenizer:
  """Ids 0-255 are bytes, 256 ends a document."""
  name = fingerprint = 'byte'
  vocab_size = 257
  eod_id = 256
  special_ids = {'eod': 256}

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode('utf-8') if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return bytes(ids[ids < 256].astype(np.uint8)).decode('utf-8', errors='replace')


def _file_fingerprint(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class HFTokenizer:
  """Any Hugging Face `tokenizer.json`: byte-level BPE (GPT-2), WordPiece (BERT), Unigram."""

  def __init__(self, path: Path):
    from tokenizers import Tokenizer
    try:
      self._tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exceptions with a message
      raise ConfigError(f"data.tokenizer='{path}' is not a valid tokenizer.json: {e}") from None
    self.name, self.fingerprint = str(path), _file_fingerprint(path)
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    self.special_ids = {k: vocab[t] for k, t in BERT_NAMES.items() if t in vocab}
    eod = next((t for t in EOD_NAMES if t in vocab), None)
    if eod is None:
      raise ConfigError(f"tokenizer {path} has no end-of-document token (one of "
                        f"{', '.join(EOD_NAMES)}); add one as a special token")
    self.eod_id = self.special_ids['eod'] = vocab[eod]

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.uint32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    # No [CLS]/[SEP] per document: the end-of-document token is appended by the caller.
    encs = self._tok.encode_batch_fast(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.uint32) for e in encs]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def vocab(self) -> dict[int, str]:
    """id -> token string (WordPiece continuations start with '##')."""
    return {i: t for t, i in self._tok.get_vocab(with_added_tokens=True).items()}


class SentencePieceTokenizer:
  """A sentencepiece `.model` file; its `</s>` (eos) ends a document."""

  def __init__(self, path: Path):
    import sentencepiece as spm
    try:
      self._sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
      raise ConfigError(f"data.tokenizer='{path}' is not a valid sentencepiece model: {e}") from None
    self.name, self.fingerprint = str(path), _file_fingerprint(path)
    self.vocab_size = self._sp.get_piece_size()
    self.eod_id = self._sp.eos_id()
    if self.eod_id < 0:
      raise ConfigError(f'sentencepiece model {path} has no end-of-sentence piece (eos_id=-1); '
                        'train it with eos_id >= 0')
    self.special_ids = {'eod': self.eod_id}
    if self._sp.pad_id() >= 0:
      self.special_ids['pad'] = self._sp.pad_id()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.uint32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, np.uint32) for ids in self._sp.encode(texts)]

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def vocab(self) -> dict[int, str]:
    return {i: self._sp.id_to_piece(i) for i in range(self.vocab_size)}


def get_tokenizer(name: str):
  """'byte', a `tokenizer.json` (or a folder holding one), or a sentencepiece `.model` file."""
  if name == 'byte':
    return ByteTokenizer()
  path = Path(name).expanduser()
  if path.is_dir() and (path / 'tokenizer.json').is_file():
    path = path / 'tokenizer.json'
  if path.is_file() and path.suffix == '.model':
    return SentencePieceTokenizer(path)
  if path.is_file():
    return HFTokenizer(path)
  raise ConfigError(f"data.tokenizer='{name}' is not available: give 'byte', a Hugging Face "
                    'tokenizer.json (or its folder) or a sentencepiece .model file')


def train_bpe(texts, vocab_size: int, out: Path, min_frequency: int = 2) -> HFTokenizer:
  """A GPT-2-style byte-level BPE trained on an iterator of documents, saved as tokenizer.json."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  if vocab_size < 257:
    raise ConfigError(f'--vocab-size {vocab_size} is too small: a byte-level BPE needs the 256 '
                      'byte symbols and <|endoftext|>, so at least 257')
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=['<|endoftext|>'], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  # Atomic: a crash never leaves a half-written tokenizer.json behind.
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f'{out.name}.tmp.{os.getpid()}')
  try:
    tok.save(str(tmp))
    os.replace(tmp, out)
  finally:
    tmp.unlink(missing_ok=True)
  return HFTokenizer(out)


def _main(argv):
  p = errors.ArgumentParser(prog='python -m shardlm.data.tokenizer',
                            description='Train a byte-level BPE tokenizer on a corpus.')
  sub = p.add_subparsers(dest='command', required=True)
  t = sub.add_parser('train', help='train a GPT-2-style byte-level BPE, save tokenizer.json')
  sources.add_input_args(t)
  t.add_argument('--vocab-size', type=int, required=True, help='ids in all, <|endoftext|> included')
  t.add_argument('--min-frequency', type=int, default=2, help='pairs seen fewer times are not merged')
  t.add_argument('--out', type=Path, required=True, help='where to write tokenizer.json')
  args = p.parse_args(argv)
  # Every input is checked before anything is written, and before any warning.
  if args.vocab_size < 257:
    raise ConfigError(f'--vocab-size {args.vocab_size} is too small: a byte-level BPE needs the 256 '
                      'byte symbols and <|endoftext|>, so at least 257')
  if args.vocab_size > 2 ** 32:
    raise ConfigError(f'--vocab-size {args.vocab_size:,} is too large: token ids are at most 32 bits '
                      f'({2 ** 32:,} ids)')
  if args.min_frequency < 0:
    raise ConfigError(f'--min-frequency {args.min_frequency} must be at least 0')
  corpus = sources.from_args(args)
  empty = sources.check_inputs(corpus)
  out = args.out
  sources.check_output(out, '--out', corpus.paths)
  if out.suffix == '.model':
    raise ConfigError(f"--out '{out}': a .model file is read as a sentencepiece model, and this writes "
                      'a Hugging Face tokenizer.json; give it another name, e.g. --out tokenizer.json')
  sources.warn_inputs(corpus, empty)
  if args.vocab_size > 1 << 20:
    errors.warn(f'--vocab-size {args.vocab_size:,} is over a million ids; a typo? (GPT-2 has 50,257)')
  if out.exists():
    errors.warn(f'{out} already exists; it is replaced once the new tokenizer is trained')
  new_dirs = sources.missing_dirs(out)
  try:
    tok = train_bpe(sources.iter_texts(corpus), args.vocab_size, out, args.min_frequency)
  except KeyboardInterrupt:
    sources.remove_dirs(new_dirs)
    print('shardlm: error: interrupted; no tokenizer written', file=sys.stderr, flush=True)
    sys.exit(130)
  except OSError as e:
    sources.remove_dirs(new_dirs)
    raise ConfigError(f'{e.filename or out}: {e.strerror}; no tokenizer written') from None
  except BaseException:
    sources.remove_dirs(new_dirs)
    raise
  if tok.vocab_size < args.vocab_size:
    errors.warn(f'the corpus gave only {tok.vocab_size:,} of the {args.vocab_size:,} ids asked for: '
                'too little text (or --min-frequency too high) for more merges')
  print(f'wrote {out}: byte-level BPE, {tok.vocab_size:,} ids, end-of-document '
        f'<|endoftext|> = {tok.eod_id}')


def main(argv=None):
  """The CLI: bad input of any kind is one `shardlm: error:` line and exit status 2."""
  errors.run_cli(_main, argv)


if __name__ == '__main__':
  main()
