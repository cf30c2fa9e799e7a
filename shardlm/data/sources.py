"""Raw corpora: files and globs, plain/gzip/zstd, JSONL or text, read in chunks that know their line numbers.

Reading is streamed: a chunk holds about a megabyte of raw documents, so memory does not grow
with the corpus (a text file read as one document is the exception: it is one document).
"""
import dataclasses
import glob
import gzip
import io
import json
import os
from pathlib import Path

from shardlm import errors
from shardlm.errors import ConfigError

JSONL_SUFFIXES = ('.jsonl', '.json', '.ndjson')
TEXT_DOCS = ('file', 'line', 'paragraph')
CHUNK_BYTES, CHUNK_DOCS = 1 << 20, 4096


@dataclasses.dataclass
class Corpus:
  """What to read: files in order, their format, and how bad documents are treated."""
  paths: list[Path]
  json_key: str = 'text'
  fmt: str = 'auto'          # auto (by suffix), jsonl, text
  text_docs: str = 'file'    # a text file is one document, or one per line, or per paragraph
  skip_bad: bool = False


@dataclasses.dataclass
class Chunk:
  """Raw documents of one file; `lines[i]` is where item i starts (1-based; 0: the whole file)."""
  path: str
  jsonl: bool
  json_key: str
  lines: list
  items: list
  disk_pos: int = 0  # on-disk bytes of the corpus consumed up to the end of this chunk


def expand(patterns) -> list[Path]:
  """Files named by paths, globs or folders, in the order given (each glob sorted), no repeats."""
  out, seen = [], set()
  for pattern in patterns:
    p = Path(pattern).expanduser()
    if p.is_dir():
      found = sorted(f for f in p.rglob('*') if f.is_file())
    elif p.is_file():
      found = [p]
    else:
      found = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not found:
      raise ConfigError(f"--input '{pattern}' matches no file")
    for f in found:
      if f.resolve() not in seen:
        seen.add(f.resolve())
        out.append(f)
  return out


def _inner_suffix(path: Path) -> str:
  suffixes = path.suffixes
  if suffixes and suffixes[-1] in ('.gz', '.zst', '.zstd'):
    suffixes = suffixes[:-1]
  return suffixes[-1] if suffixes else ''


def open_binary(path: Path):
  """(decompressed byte stream, raw file) for plain, .gz and .zst/.zstd files."""
  try:
    raw = open(path, 'rb')
  except OSError as e:
    raise ConfigError(f'cannot read {path}: {e.strerror}') from None
  if path.suffix == '.gz':
    return gzip.GzipFile(fileobj=raw), raw
  if path.suffix in ('.zst', '.zstd'):
    import zstandard
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)), raw
  return raw, raw


def _documents(stream, jsonl: bool, text_docs: str):
  """(line number, raw bytes) per document of one file."""
  if not jsonl and text_docs == 'file':
    data = stream.read()
    if data:  # an empty file is no document, as a blank line is none
      yield 0, data
    return
  para, para_line = [], 0
  for n, line in enumerate(stream, 1):
    if jsonl or text_docs == 'line':
      body = line.rstrip(b'\r\n')
      if body.strip():
        yield n, body
    elif line.strip():
      para_line = para_line or n
      para.append(line)
    elif para:
      yield para_line, b''.join(para).rstrip(b'\r\n')
      para, para_line = [], 0
  if para:
    yield para_line, b''.join(para).rstrip(b'\r\n')


def chunks(corpus: Corpus):
  """Chunks of raw documents, in corpus order; a chunk never spans two files."""
  done = 0
  for path in corpus.paths:
    jsonl = corpus.fmt == 'jsonl' or (corpus.fmt == 'auto' and _inner_suffix(path) in JSONL_SUFFIXES)
    stream, raw = open_binary(path)
    try:
      chunk, size = Chunk(str(path), jsonl, corpus.json_key, [], []), 0
      try:
        for n, doc in _documents(stream, jsonl, corpus.text_docs):
          chunk.lines.append(n)
          chunk.items.append(doc)
          size += len(doc)
          if size >= CHUNK_BYTES or len(chunk.items) >= CHUNK_DOCS:
            chunk.disk_pos = done + raw.tell()
            yield chunk
            chunk, size = Chunk(str(path), jsonl, corpus.json_key, [], []), 0
      except (OSError, EOFError) as e:  # gzip/zstd raise these on a damaged stream
        raise ConfigError(f'{path}: cannot decompress: {e}') from None
      done += os.fstat(raw.fileno()).st_size
      chunk.disk_pos = done
      if chunk.items:
        yield chunk
    finally:
      stream.close()
      raw.close()


def _utf8_error(e: UnicodeDecodeError) -> str:
  return f'not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})'


def parse(chunk: Chunk) -> tuple[list[str], list[tuple[int, str]]]:
  """The chunk's texts, and (line, reason) for each document that could not be read."""
  texts, bad = [], []
  for n, raw in zip(chunk.lines, chunk.items):
    try:
      text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
      bad.append((n, _utf8_error(e)))
      continue
    if chunk.jsonl:
      try:
        record = json.loads(text)
      except json.JSONDecodeError as e:
        bad.append((n, f'invalid JSON ({e.msg} at column {e.colno})'))
        continue
      text = record.get(chunk.json_key) if isinstance(record, dict) else None
      if not isinstance(text, str):
        bad.append((n, f"no string field '{chunk.json_key}' (set it with --json-key)"))
        continue
      if b'\\ud' in raw or b'\\uD' in raw:  # a lone surrogate escape is not encodable text
        try:
          text.encode('utf-8')
        except UnicodeEncodeError:
          bad.append((n, 'text holds an unpaired surrogate (\\ud800-\\udfff), not valid Unicode'))
          continue
    texts.append(text)
  return texts, bad


def bad_document(path: str, line: int, reason: str) -> ConfigError:
  where = f'{path}:{line}' if line else path
  return ConfigError(f'{where}: {reason}; pass --skip-bad-lines to skip such documents')


def iter_texts(corpus: Corpus):
  """Every document's text in order; a bad document is an error unless corpus.skip_bad."""
  count = 0
  for chunk in chunks(corpus):
    texts, bad = parse(chunk)
    if bad and not corpus.skip_bad:
      raise bad_document(chunk.path, *bad[0])
    count += len(texts)
    yield from texts
  if not count:
    raise empty_corpus(corpus)


def empty_corpus(corpus: Corpus) -> ConfigError:
  names = ', '.join(str(p) for p in corpus.paths[:3]) + (' ...' if len(corpus.paths) > 3 else '')
  return ConfigError(f'the corpus ({names}) holds no documents')


def add_input_args(parser):
  parser.add_argument('--input', nargs='+', required=True,
                      help='files, folders or quoted globs; .jsonl/.json/.ndjson are JSON lines, '
                           'anything else text; .gz and .zst are decompressed')
  parser.add_argument('--json-key', default='text', help='the JSON field holding the text')
  parser.add_argument('--format', choices=('auto', 'jsonl', 'text'), default='auto')
  parser.add_argument('--text-docs', choices=TEXT_DOCS, default='file',
                      help='in text files, a document is the whole file, a line or a paragraph')
  parser.add_argument('--skip-bad-lines', action='store_true',
                      help='skip documents that are not valid JSON / UTF-8 instead of stopping')


def from_args(args) -> Corpus:
  return Corpus(expand(args.input), args.json_key, args.format, args.text_docs, args.skip_bad_lines)


# -- checks before anything is written (preprocess and the tokenizer trainer) --------------------

def check_inputs(corpus: Corpus) -> list[Path]:
  """Raises if an input file cannot be read or every one is empty; returns the empty ones."""
  empty = []
  for path in corpus.paths:
    try:
      size = path.stat().st_size
    except OSError as e:
      raise ConfigError(f'cannot read {path}: {e.strerror}') from None
    if not os.access(path, os.R_OK):
      raise ConfigError(f'cannot read {path}: permission denied')
    if size == 0:
      empty.append(path)
  if len(empty) == len(corpus.paths):
    raise empty_corpus(corpus)
  return empty


def check_output(path, flag: str, inputs=()) -> None:
  """Raises unless a file can be written at `path`: not a folder, not an input, its folder creatable."""
  path = Path(path)
  if not path.name or path.is_dir():
    raise ConfigError(f"{flag}: '{path}' is a folder; give a file name")
  if os.path.lexists(path) and not path.is_file():
    raise ConfigError(f"{flag}: '{path}' exists and is not a regular file")
  if path.exists() and any(path.samefile(p) for p in inputs):
    raise ConfigError(f"{flag}: '{path}' is one of the inputs; writing it would destroy the corpus")
  for parent in Path(os.path.abspath(path)).parents:  # the nearest that exists must be a writable folder
    if os.path.lexists(parent):
      if not parent.is_dir():
        raise ConfigError(f"{flag}: cannot write '{path}': {parent} is not a folder")
      if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}: cannot write '{path}': no permission to write in {parent}")
      return


def missing_dirs(path) -> list[Path]:
  """The folders above `path` that do not exist yet, deepest first: those writing it creates."""
  out = []
  for parent in Path(os.path.abspath(path)).parents:
    if os.path.lexists(parent):
      break
    out.append(parent)
  return out


def remove_dirs(dirs: list[Path]) -> None:
  """Removes the folders `missing_dirs` listed (deepest first) while they are empty."""
  for d in dirs:
    try:
      d.rmdir()
    except FileNotFoundError:  # never made: a folder above it may have been
      continue
    except OSError:  # not empty: someone else's now, and so are the folders above
      return


def cpu_count() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def warn_inputs(corpus: Corpus, empty: list[Path]) -> None:
  """Warnings for inputs that are legal but almost certainly not what was meant."""
  if empty:
    names = ', '.join(str(p) for p in empty[:3]) + (' ...' if len(empty) > 3 else '')
    errors.warn(f'{len(empty)} of the {len(corpus.paths)} input files are empty ({names}); '
                'they add no documents')
  suffixes = [_inner_suffix(p) for p in corpus.paths]
  jsonl = [corpus.fmt == 'jsonl' or (corpus.fmt == 'auto' and s in JSONL_SUFFIXES) for s in suffixes]
  if corpus.json_key != 'text' and not any(jsonl):
    errors.warn(f"--json-key '{corpus.json_key}' is ignored: no input is JSON lines (.jsonl, .json, "
                '.ndjson, or --format jsonl)')
  if corpus.text_docs != 'file' and all(jsonl):
    errors.warn(f'--text-docs {corpus.text_docs} is ignored: every input is JSON lines, one document a line')
