"""Bad data: one `shardlm: error:` line, exit status 2, and no output that looks complete."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import shardlm
from shardlm import config
from shardlm.data import indexed, preprocess, sources


def run_preprocess(capsys, *args) -> tuple[int, str, str]:
  """The CLI in this process: (exit status, stdout, stderr)."""
  try:
    preprocess.main(['--no-progress', *map(str, args)])
    code = 0
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def assert_rejected(code, err, *expected):
  lines = [l for l in err.splitlines() if l.strip()]
  assert code == 2 and len(lines) == 1, err
  assert lines[0].startswith('shardlm: error: ')
  for s in expected:
    assert s in lines[0], lines[0]


def outputs(tmp_path, name='out'):
  return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(name))


@pytest.fixture
def good(tmp_path):
  path = tmp_path / 'good.jsonl'
  path.write_text(''.join(json.dumps({'text': f'document {i} ' * 20}) + '\n' for i in range(40)))
  return path


CORPORA = {
    # name: (file name, content, substrings of the error)
    'invalid JSON': ('c.jsonl', b'{"text": "a"}\n{"text": "b"}\n{"text": oops}\n{"text": "d"}\n',
                     ['c.jsonl:3:', 'invalid JSON', '--skip-bad-lines']),
    'missing key': ('c.jsonl', b'{"text": "a"}\n\n{"body": "b"}\n', ['c.jsonl:3:', "no string field 'text'"]),
    'not an object': ('c.jsonl', b'["text"]\n', ['c.jsonl:1:', "no string field 'text'"]),
    'non-UTF-8 JSON line': ('c.jsonl', b'{"text": "a"}\n{"text": "caf\xe9"}\n', ['c.jsonl:2:', 'UTF-8']),
    'lone surrogate': ('c.jsonl', b'{"text": "a"}\n{"text": "x\\udc80"}\n', ['c.jsonl:2:', 'surrogate']),
    'non-UTF-8 text': ('c.txt', b'caf\xe9 au lait\n', ['c.txt:', 'not valid UTF-8', '0xe9']),
    'empty corpus': ('c.jsonl', b'\n  \n', ['holds no documents']),
    'empty text file': ('c.txt', b'', ['holds no documents']),
    'damaged gzip': ('c.jsonl.gz', gzip.compress(b'{"text": "a"}\n' * 1000)[:-30], ['c.jsonl.gz', 'decompress']),
}


@pytest.mark.parametrize('name, content, expected', CORPORA.values(), ids=CORPORA.keys())
def test_bad_corpus_is_rejected_with_nothing_written(name, content, expected, tmp_path, capsys):
  (tmp_path / name).write_bytes(content)
  mode = ['--text-docs', 'line'] if name == 'c.txt' and content else []
  code, out, err = run_preprocess(capsys, '--input', tmp_path / name, '--output-prefix', tmp_path / 'out', *mode)
  assert_rejected(code, err, *expected)
  assert outputs(tmp_path) == []  # not even temporary files


def test_skip_bad_lines_goes_on_and_counts_them(tmp_path, capsys):
  (tmp_path / 'c.jsonl').write_bytes(CORPORA['invalid JSON'][1] + b'{"text": "caf\xe9"}\n')
  code, out, err = run_preprocess(capsys, '--input', tmp_path / 'c.jsonl', '--output-prefix',
                                  tmp_path / 'out', '--skip-bad-lines')
  assert code == 0, err
  assert '3 documents' in out and '2 skipped' in out
  ds = indexed.IndexedDataset(tmp_path / 'out')
  assert [bytes(ds[i][:-1].astype(np.uint8)) for i in range(len(ds))] == [b'a', b'b', b'd']


def test_missing_input_and_bad_arguments(tmp_path, capsys, good):
  cases = [
      (['--input', tmp_path / 'nosuch*.jsonl'], ["'", 'nosuch*.jsonl', 'matches no file']),
      (['--input', good, '--dtype', 'uint8'], ['257 ids does not fit uint8', 'uint16']),
      (['--input', good, '--tokenizer', tmp_path / 'nosuch.json'], ['data.tokenizer', 'nosuch.json']),
      (['--input', good, '--workers', '0'], ['--workers 0']),
  ]
  for args, expected in cases:
    code, out, err = run_preprocess(capsys, *args, '--output-prefix', tmp_path / 'out')
    assert_rejected(code, err, *expected)
    assert outputs(tmp_path) == []


def test_interrupt_leaves_nothing_and_an_old_pair_stays_whole(tmp_path, capsys, good, monkeypatch):
  code, _, _ = run_preprocess(capsys, '--input', good, '--output-prefix', tmp_path / 'out')
  before = {p: (tmp_path / p).read_bytes() for p in ('out.bin', 'out.idx')}
  monkeypatch.setattr(sources, 'CHUNK_DOCS', 5)
  calls = []

  def add(self, tokens, lengths):  # Ctrl-C arrives while the third chunk is written
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    self._bin.write(tokens.tobytes())
  monkeypatch.setattr(indexed.Writer, 'add', add)
  (tmp_path / 'more.jsonl').write_text(good.read_text() * 2)
  code, out, err = run_preprocess(capsys, '--input', tmp_path / 'more.jsonl', '--output-prefix', tmp_path / 'out')
  assert code == 130 and 'interrupted' in err
  assert outputs(tmp_path) == ['out.bin', 'out.idx']  # no temporary file left
  assert {p: (tmp_path / p).read_bytes() for p in before} == before
  indexed.IndexedDataset(tmp_path / 'out')


@pytest.fixture
def dataset(tmp_path, capsys, good):
  code, _, err = run_preprocess(capsys, '--input', good, '--output-prefix', tmp_path / 'ds')
  assert code == 0, err
  return tmp_path / 'ds'


def damage(path: Path, offset: int, data: bytes = None, size: int = None):
  raw = bytearray(path.read_bytes())
  if data is not None:
    raw[offset:offset + len(data)] = data
  path.write_bytes(bytes(raw[:size] if size is not None else raw))


DAMAGE = {
    # what: (file, offset, new bytes, new size, substrings of the error)
    'truncated .bin': ('.bin', 0, None, -2, ['ds.bin', 'truncated']),
    'grown .bin': ('.bin', 0, None, None, ['ds.bin']),
    'bad magic': ('.idx', 0, b'MMIDIDX\x00', None, ['ds.idx', 'magic']),
    'future version': ('.idx', 8, (9).to_bytes(4, 'little'), None, ['ds.idx', 'version 9']),
    'token size 3': ('.idx', 12, (3).to_bytes(4, 'little'), None, ['ds.idx', 'token size 3']),
    'vocabulary too large for the dtype': ('.idx', 16, (70000).to_bytes(8, 'little'), None,
                                           ['70,000 ids does not fit 2-byte tokens']),
    'flipped offset byte': ('.idx', indexed.HEADER.size + 8 * 7 + 1, b'\x01', None, ['ds.idx', 'offsets']),
    'flipped vocabulary': ('.idx', 16, (258).to_bytes(8, 'little'), None, ['ds.idx', 'checksum']),
    'truncated .idx': ('.idx', 0, None, -8, ['ds.idx', 'bytes for 40 documents']),
    'header only': ('.idx', 0, None, 20, ['shorter than the 48-byte header']),
}


@pytest.mark.parametrize('ext, offset, data, size, expected', DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_dataset_is_rejected_when_opened(ext, offset, data, size, expected, dataset):
  path = dataset.with_suffix(ext)
  if ext == '.bin' and size is None:
    path.write_bytes(path.read_bytes() + b'\0\0')
  else:
    damage(path, offset, data, size if size is None or size >= 0 else path.stat().st_size + size)
  with pytest.raises(config.ConfigError) as e:
    indexed.IndexedDataset(dataset)
  for s in expected:
    assert s in str(e.value)


def test_an_offset_swap_that_stays_increasing_is_caught_by_the_checksum(dataset):
  idx = dataset.with_suffix('.idx')
  offsets = np.frombuffer(idx.read_bytes()[indexed.HEADER.size:], '<u8').copy()
  offsets[5] += 1  # still strictly increasing, so only the checksum can tell
  damage(idx, indexed.HEADER.size, offsets.tobytes())
  with pytest.raises(config.ConfigError, match='checksum'):
    indexed.IndexedDataset(dataset)


def run_train(tmp_path, *overrides) -> subprocess.CompletedProcess:
  repo = str(Path(shardlm.__file__).resolve().parent.parent)  # the code under test
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': os.pathsep.join([repo] + [p for p in [os.environ.get('PYTHONPATH')] if p])}
  return subprocess.run([sys.executable, '-m', 'shardlm.train', *overrides,
                         f'--config.train.run_dir={tmp_path / "run"}'],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('what', ['corrupted .idx', 'missing dataset', 'tokenizer mismatch'])
def test_train_stops_on_bad_data_before_writing(what, dataset, tmp_path):
  overrides = [f"--config.data.paths=('{dataset}',)"]
  expected = {'corrupted .idx': ['ds.idx', 'checksum'],
              'missing dataset': ['nosuch.idx not found', 'preprocess'],
              'tokenizer mismatch': ['vocabulary of 257 ids', 'data.tokenizer']}[what]
  if what == 'corrupted .idx':
    damage(dataset.with_suffix('.idx'), 16, (258).to_bytes(8, 'little'))
  elif what == 'missing dataset':
    overrides = [f"--config.data.paths=('{tmp_path / 'nosuch'}',)"]
  else:
    from shardlm.data import tokenizer
    tokenizer.train_bpe(iter(['one two three'] * 5), 300, tmp_path / 'tok.json')
    overrides += [f'--config.data.tokenizer={tmp_path / "tok.json"}', '--config.model.vocab_size=300']
  proc = run_train(tmp_path, *overrides)
  assert_rejected(proc.returncode, proc.stderr, *expected)
  assert proc.stdout == '' and not (tmp_path / 'run').exists()
