"""`python -m shardlm.data.demos docstrings|packages --out DIR`: fine-tuning tasks with real labels
and no download, from the default corpus (the Python standard library's own files).

docstrings: a function's code -> the first line of its docstring (summarization, scored by ROUGE
and BLEU). The test functions come from the files the default run holds out (the validation and
test split of data.split='969,30,1', the last documents), so the pretrained model never saw them.
Baseline: the function's name split into words ("get_user_name" -> "get user name").

packages: a chunk of code -> the top-level package its file belongs to (asyncio, email, ...),
classes balanced. Whole files are held out (every fifth file of each package) for the test set.
Baseline: the most frequent label.

Each writes DIR/train.jsonl, DIR/valid.jsonl and DIR/test.jsonl, and prints the baseline's scores
on the test set.
"""
import argparse
import ast
import json
import re
import sysconfig
import textwrap
from pathlib import Path

import numpy as np

from shardlm import errors, metrics
from shardlm.data import loader, preprocess

PROMPT_BYTES = 72   # the code shown, whole lines: the default run's model has 128 positions
SUMMARY_BYTES = 50  # functions whose summary line is longer are left out
PACKAGES = ('asyncio', 'ctypes', 'distutils', 'email', 'encodings', 'idlelib', 'tkinter', 'unittest')
CHUNK_BYTES = 120   # a classification example: fits the default run's 128 positions


def readable_files() -> list[tuple[Path, str]]:
  """(path, text) of the standard library's files that the default corpus holds as documents, in
  its order: UTF-8 and not empty (data/sources.py skips the rest)."""
  out = []
  for f in preprocess.stdlib_files():
    try:
      text = f.read_text('utf-8')
    except UnicodeDecodeError:
      continue
    if text:
      out.append((f, text))
  return out


def function_examples(path: Path, text: str) -> list[dict]:
  """{"prompt": code, "completion": summary, "name"} of each function with a short docstring."""
  try:
    tree = ast.parse(text)
  except (SyntaxError, ValueError):
    return []
  out = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    doc = ast.get_docstring(node)
    summary = doc.strip().split('\n')[0].strip() if doc else ''
    if not 10 <= len(summary) <= SUMMARY_BYTES or not summary.isascii():
      continue
    source = ast.get_source_segment(text, node) or ''
    docstring = ast.get_source_segment(text, node.body[0]) or ''
    code = textwrap.dedent(source.replace(docstring, '', 1))  # the function without its docstring
    lines = [line for line in code.split('\n') if line.strip()]
    shown = ''
    for line in lines:
      if len(shown) + len(line) + 1 > PROMPT_BYTES:
        break
      shown += line + '\n'
    if not shown or not shown.isascii():
      continue
    out.append({'prompt': shown + '# summary:', 'completion': ' ' + summary, 'name': node.name,
                'file': str(path)})
  return out


def name_baseline(name: str) -> str:
  """A function's name as words: get_user_name -> get user name; parseURL -> parse url."""
  words = re.sub(r'([a-z0-9])([A-Z])', r'\1 \2', name.strip('_')).replace('_', ' ')
  return ' '.join(words.lower().split())


def docstrings(out: Path) -> dict:
  files = readable_files()
  train_end = loader.split_ranges(len(files), loader.split_fractions('969,30,1'))[0][1]
  held = [e for f, t in files[train_end:] for e in function_examples(f, t)]
  seen = [e for f, t in files[:train_end] for e in function_examples(f, t)]
  rng = np.random.default_rng(0)
  seen = [seen[i] for i in rng.permutation(len(seen))]
  valid, train = seen[:200], seen[200:]
  write(out, {'train': train, 'valid': valid, 'test': held})
  base = metrics.score([name_baseline(e['name']) for e in held], [e['completion'].strip() for e in held],
                       ('rouge', 'bleu'))
  return {'task': 'docstrings', 'train': len(train), 'valid': len(valid), 'test': len(held),
          'test_files': f'{len(files) - train_end} held-out files of the default corpus',
          'baseline': 'the function name split into words', **base}


def packages(out: Path, per_class: int = 400, test_per_class: int = 60) -> dict:
  root = Path(sysconfig.get_paths()['stdlib'])
  chunks = {split: [] for split in ('train', 'test')}
  every = readable_files()
  present = {f.relative_to(root).parts[0] for f, _ in every}
  missing = [p for p in PACKAGES if p not in present]
  if missing:  # distutils left in Python 3.12; some builds lack tkinter and idlelib
    raise errors.ConfigError(f"this Python's standard library ({root}) lacks {', '.join(missing)}: "
                             'the packages demo needs all of ' + ', '.join(PACKAGES))
  for package in PACKAGES:
    texts = [t for f, t in every if f.relative_to(root).parts[0] == package]
    for k, text in enumerate(texts):
      split = 'test' if k % 5 == 0 else 'train'
      data = text.encode()
      for at in range(0, len(data) - CHUNK_BYTES, CHUNK_BYTES):
        piece = data[at:at + CHUNK_BYTES].decode('utf-8', 'ignore')
        if piece.strip():
          chunks[split].append({'text': piece, 'label': package})
  rng = np.random.default_rng(0)
  picked = {}
  for split, n in (('train', per_class), ('test', test_per_class)):
    rows = []
    for package in PACKAGES:  # balanced: the same number of chunks from every package
      mine = [c for c in chunks[split] if c['label'] == package]
      rows += [mine[i] for i in rng.permutation(len(mine))[:n]]
    picked[split] = [rows[i] for i in rng.permutation(len(rows))]
  train = picked['train']
  valid, train = train[:len(PACKAGES) * 20], train[len(PACKAGES) * 20:]
  write(out, {'train': train, 'valid': valid, 'test': picked['test']})
  labels = [c['label'] for c in picked['test']]
  majority = max(set(labels), key=labels.count)
  return {'task': 'packages', 'labels': list(PACKAGES), 'train': len(train), 'valid': len(valid),
          'test': len(labels), 'baseline': f'always {majority!r}',
          'baseline_accuracy': 100 * labels.count(majority) / len(labels)}


def write(out: Path, splits: dict) -> None:
  """The splits as JSONL files: all written to temporary names first, then renamed."""
  try:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
      (out / f'.{name}.jsonl.tmp').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  except OSError as e:
    raise errors.ConfigError(f'--out {out}: cannot write there ({e.strerror})') from None
  for name in splits:
    (out / f'.{name}.jsonl.tmp').replace(out / f'{name}.jsonl')


def main(argv=None):
  errors.run_cli(_main, argv)


def _main(argv):
  p = errors.ArgumentParser(prog='python -m shardlm.data.demos', description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('task', choices=('docstrings', 'packages'))
  p.add_argument('--out', required=True, help='a directory for train/valid/test.jsonl')
  args = p.parse_args(argv)
  out = Path(args.out)
  if out.exists() and not out.is_dir():
    raise errors.ConfigError(f'--out {out} is a file; give a directory')
  print(json.dumps((docstrings if args.task == 'docstrings' else packages)(out), indent=2))


if __name__ == '__main__':
  main()
