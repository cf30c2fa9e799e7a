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
from shardlm.data import indexed, preprocess, sources, tokenizer


def run_cli(capsys, main, args) -> tuple[int, str, str]:
  """A CLI's main in this process: (exit status, stdout, stderr)."""
  try:
    main([str(a) for a in args])
    code = 0
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def run_preprocess(capsys, *args) -> tuple[int, str, str]:
  return run_cli(capsys, preprocess.main, ['--no-progress', *args])


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
    'damaged gzip': ('c.jsonl.gz', gzip.compress(b'{"text": "a"}\n' * 1000)[:-30],
                     ['c.jsonl.gz', 'decompress']),
}


@pytest.mark.parametrize('name, content, expected', CORPORA.values(), ids=CORPORA.keys())
def test_bad_corpus_is_rejected_with_nothing_written(name, content, expected, tmp_path, capsys):
  (tmp_path / name).write_bytes(content)
  mode = ['--text-docs', 'line'] if name == 'c.txt' and content else []
  code, out, err = run_preprocess(capsys, '--input', tmp_path / name, '--output-prefix', tmp_path / 'out',
                                  *mode)
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
  code, out, err = run_preprocess(capsys, '--input', tmp_path / 'more.jsonl', '--output-prefix',
                                  tmp_path / 'out')
  assert code == 130 and 'interrupted' in err
  assert outputs(tmp_path) == ['out.bin', 'out.idx']  # no temporary file left
  assert {p: (tmp_path / p).read_bytes() for p in before} == before
  indexed.IndexedDataset(tmp_path / 'out')


def run_tokenizer(capsys, *args) -> tuple[int, str, str]:
  """`python -m shardlm.data.tokenizer train ARGS` in this process."""
  return run_cli(capsys, tokenizer.main, ['train', *args])


def warnings(err) -> list[str]:
  return [l for l in err.splitlines() if l.startswith('shardlm: warning: ')]


INPUTS = {
    # name: (files to write, --input, extra flags, substrings of the error)
    'empty file': ({'c.jsonl': b''}, 'c.jsonl', [], ['c.jsonl', 'holds no documents']),
    'empty files': ({'a.txt': b'', 'b.txt': b''}, '*.txt', [], ['a.txt, ', 'b.txt', 'holds no documents']),
    'blank lines only': ({'c.jsonl': b'\n \n'}, 'c.jsonl', [], ['holds no documents']),
    'missing file': ({}, 'nosuch.jsonl', [], ['nosuch.jsonl', 'matches no file']),
    'empty folder': ({'sub/.keep': None}, 'sub', [], ['sub', 'matches no file']),
    'non-UTF-8 text': ({'c.txt': b'caf\xe9\n'}, 'c.txt', [], ['c.txt', 'not valid UTF-8']),
    'non-UTF-8 JSON line': ({'c.jsonl': b'{"text": "a"}\n{"text": "caf\xe9"}\n'}, 'c.jsonl', [],
                            ['c.jsonl:2:', 'UTF-8']),
    'bad line after written chunks': ({'c.jsonl': b'{"text": "a"}\n' * 50 + b'oops\n'}, 'c.jsonl', [],
                                      ['c.jsonl:51:', 'invalid JSON']),
    'tokenizer not found': ({'c.jsonl': b'{"text": "a"}\n'}, 'c.jsonl', ['--tokenizer', 'nosuch.json'],
                            ['nosuch.json']),
    'non-integer --workers': ({'c.jsonl': b'{"text": "a"}\n'}, 'c.jsonl', ['--workers', '2.5'],
                              ['--workers', "'2.5'", '--help']),
    'negative --workers': ({'c.jsonl': b'{"text": "a"}\n'}, 'c.jsonl', ['--workers', '-1'], ['--workers -1']),
    'far too many --workers': ({'c.jsonl': b'{"text": "a"}\n'}, 'c.jsonl', ['--workers', '100000'],
                               ['--workers 100000', 'per CPU']),
    'unknown --dtype': ({'c.jsonl': b'{"text": "a"}\n'}, 'c.jsonl', ['--dtype', 'uint64'],
                        ['--dtype', 'uint64']),
    'unknown flag': ({'c.jsonl': b'{"text": "a"}\n'}, 'c.jsonl', ['--wrokers', '2'], ['--wrokers']),
}


@pytest.mark.parametrize('files, pattern, flags, expected', INPUTS.values(), ids=INPUTS.keys())
def test_bad_input_leaves_no_output_folder(files, pattern, flags, expected, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(sources, 'CHUNK_DOCS', 10)  # the bad line comes after chunks were written
  monkeypatch.chdir(tmp_path)
  for name, content in files.items():
    (tmp_path / name).parent.mkdir(exist_ok=True)
    if content is not None:
      (tmp_path / name).write_bytes(content)
  code, out, err = run_preprocess(capsys, '--input', pattern, '--output-prefix',
                                  tmp_path / 'new' / 'sub' / 'out', *flags)
  assert_rejected(code, err, *expected)
  assert out == '' and not (tmp_path / 'new').exists()


def test_interrupt_or_write_error_removes_the_folders_it_made(tmp_path, capsys, good, monkeypatch):
  for error, code, message in [(KeyboardInterrupt, 130, 'interrupted'),
                               (OSError(28, 'No space left on device'), 2, 'No space left on device')]:
    def add(self, tokens, lengths, error=error):
      self._bin.write(tokens.tobytes())
      raise error
    monkeypatch.setattr(indexed.Writer, 'add', add)
    got, out, err = run_preprocess(capsys, '--input', good, '--output-prefix', tmp_path / 'new' / 'out')
    assert got == code and out == '' and message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['good.jsonl']


def test_the_real_cli_rejects_an_empty_input_and_creates_nothing(tmp_path):
  (tmp_path / 'c.jsonl').write_bytes(b'')
  repo = str(Path(shardlm.__file__).resolve().parent.parent)
  proc = subprocess.run([sys.executable, '-m', 'shardlm.data.preprocess', '--input', 'c.jsonl',
                         '--output-prefix', 'new/out'], cwd=tmp_path, capture_output=True, text=True,
                        env={**os.environ, 'PYTHONPATH': repo}, timeout=120, check=False)
  assert_rejected(proc.returncode, proc.stderr, 'c.jsonl', 'holds no documents')
  assert proc.stdout == '' and not (tmp_path / 'new').exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['c.jsonl']


@pytest.mark.parametrize('what', ['prefix ends in /', 'empty prefix', 'under a file', '.bin is a folder',
                                  'an input is the output'])
def test_bad_output_prefix_is_rejected_before_anything_is_written(what, tmp_path, capsys, good, monkeypatch):
  monkeypatch.chdir(tmp_path)
  inputs = [good]
  if what == 'prefix ends in /':
    prefix, expected = f'{tmp_path / "new"}/', ['names no file']
  elif what == 'empty prefix':
    prefix, expected = '', ['names no file']
  elif what == 'under a file':
    prefix, expected = good / 'out', ['good.jsonl is not a folder']
  elif what == '.bin is a folder':
    (tmp_path / 'out.bin').mkdir()
    prefix, expected = tmp_path / 'out', ['out.bin', 'is a folder']
  else:
    (tmp_path / 'out.idx').write_text('{"text": "an input named like an output"}\n')
    inputs.append(tmp_path / 'out.idx')
    prefix, expected = tmp_path / 'out', ['out.idx', 'one of the inputs']
  before = sorted(p.name for p in tmp_path.iterdir())
  code, out, err = run_preprocess(capsys, '--input', *inputs, '--format', 'jsonl', '--output-prefix', prefix)
  assert_rejected(code, err, '--output-prefix', *expected)
  assert out == '' and sorted(p.name for p in tmp_path.iterdir()) == before


def test_likely_mistakes_are_one_warning_line_each(tmp_path, capsys, good, monkeypatch):
  monkeypatch.setattr(sources, 'cpu_count', lambda: 1)
  (tmp_path / 'empty.jsonl').write_bytes(b'')
  (tmp_path / 'out').mkdir()  # a folder named like the prefix: the files go beside it
  code, out, err = run_preprocess(capsys, '--input', good, tmp_path / 'empty.jsonl', '--output-prefix',
                                  tmp_path / 'out', '--workers', '2', '--text-docs', 'line')
  assert code == 0 and 'wrote' in out, err
  assert [l for l in err.splitlines() if l.strip()] == warnings(err)
  for s in ['empty.jsonl', '--workers 2 is more than the 1 CPUs', '--text-docs line is ignored',
            'is a folder']:
    assert sum(s in l for l in warnings(err)) == 1, (s, err)
  code, out, err = run_preprocess(capsys, '--input', good, '--output-prefix', tmp_path / 'out')
  assert code == 0 and len(warnings(err)) == 2, err
  assert warnings(err)[1] == (f'shardlm: warning: out.bin and out.idx in {tmp_path} already exist; they '
                              'are replaced once the new files are complete')
  assert 'is a folder' in warnings(err)[0]
  (tmp_path / 'c.txt').write_text('plain text\n')
  code, out, err = run_preprocess(capsys, '--input', tmp_path / 'c.txt', '--json-key', 'body',
                                  '--output-prefix', tmp_path / 'txt')
  assert code == 0 and len(warnings(err)) == 1 and "--json-key 'body' is ignored" in err


TRAIN = {
    # name: (files to write, arguments, substrings of the error)
    'empty input': ({'c.jsonl': b''}, ['--input', 'c.jsonl', '--vocab-size', 300], ['holds no documents']),
    'missing input': ({}, ['--input', 'nosuch.jsonl', '--vocab-size', 300], ['matches no file']),
    'non-UTF-8 input': ({'c.txt': b'caf\xe9\n'}, ['--input', 'c.txt', '--vocab-size', 300],
                        ['not valid UTF-8']),
    'vocabulary too small': ({'c.jsonl': b'{"text": "a"}\n'}, ['--input', 'c.jsonl', '--vocab-size', 256],
                             ['--vocab-size 256', 'at least 257']),
    'vocabulary too large': ({'c.jsonl': b'{"text": "a"}\n'}, ['--input', 'c.jsonl', '--vocab-size', 2 ** 33],
                             ['too large']),
    'non-integer vocabulary': ({'c.jsonl': b'{"text": "a"}\n'}, ['--input', 'c.jsonl', '--vocab-size', '3e4'],
                               ['--vocab-size', "'3e4'"]),
    'negative min frequency': ({'c.jsonl': b'{"text": "a"}\n'},
                               ['--input', 'c.jsonl', '--vocab-size', 300, '--min-frequency', -1],
                               ['--min-frequency -1']),
    'missing --vocab-size': ({'c.jsonl': b'{"text": "a"}\n'}, ['--input', 'c.jsonl'], ['--vocab-size']),
}


@pytest.mark.parametrize('files, args, expected', TRAIN.values(), ids=TRAIN.keys())
def test_tokenizer_cli_rejects_bad_input_and_creates_nothing(files, args, expected, tmp_path, capsys,
                                                             monkeypatch):
  monkeypatch.chdir(tmp_path)
  for name, content in files.items():
    (tmp_path / name).write_bytes(content)
  code, out, err = run_tokenizer(capsys, *args, '--out', tmp_path / 'new' / 'tokenizer.json')
  assert_rejected(code, err, *expected)
  assert out == '' and not (tmp_path / 'new').exists()


@pytest.mark.parametrize('out, expected', [('d', ['is a folder']), ('tok.model', ['sentencepiece']),
                                           ('good.jsonl', ['one of the inputs']),
                                           ('good.jsonl/tok.json', ['is not a folder'])])
def test_tokenizer_cli_rejects_a_bad_out(out, expected, tmp_path, capsys, good):
  (tmp_path / 'd').mkdir()
  before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
  code, _, err = run_tokenizer(capsys, '--input', good, '--vocab-size', 300, '--out', tmp_path / out)
  assert_rejected(code, err, '--out', *expected)
  assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_tokenizer_cli_warns_when_the_corpus_is_too_small_or_the_file_exists(tmp_path, capsys, good):
  out = tmp_path / 'tok.json'
  code, stdout, err = run_tokenizer(capsys, '--input', good, '--vocab-size', 5000, '--out', out)
  assert code == 0 and 'wrote' in stdout, err
  assert len(warnings(err)) == 1 and 'of the 5,000 ids asked for' in err
  code, stdout, err = run_tokenizer(capsys, '--input', good, '--vocab-size', 260, '--out', out)
  assert code == 0 and warnings(err) == [(f'shardlm: warning: {out} already exists; it is replaced once '
                                          'the new tokenizer is trained')]
  assert tokenizer.get_tokenizer(str(out)).vocab_size == 260


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
