"""Fine-tuning data: JSONL examples checked line by line, tokenized, and served as step-indexed
global batches.

Supervised fine-tuning (GPT): {"prompt", "completion"} or {"messages": [{"role", "content"}...]}.
An example is its prompt's tokens, then its completion's and end-of-document; the loss counts the
completion's (a dialogue's assistant turns'). Several examples are packed into one row of T + 1
tokens with segment ids 1, 2, ... (0: padding), so that attention stays inside an example and
positions restart at each (GPT's `segments_bt`).

Classification (GPT on its last token, BERT on [CLS]): {"text", "label"} or
{"text_a", "text_b", "label"}, the label one of `data.labels`. Multiple choice (RACE-style):
{"text", "choices": [...], "label": the right choice's index}; each choice is scored as
text_a = text, text_b = the choice, and a softmax taken over the choices.

Every line of a file is checked before anything is tokenized: a bad one is one ConfigError naming
the file and line.
"""
import json
from pathlib import Path

import jax
import numpy as np

from shardlm.data import bert as bert_data, loader
from shardlm.errors import ConfigError

OVERLONG = ('error', 'truncate')
ROLES = ('system', 'user', 'assistant')


def read_jsonl(path, formats: dict) -> list[dict]:
  """The file's examples, each a JSON object with one of the key sets in `formats` ({name: keys});
  string values, non-empty where `check` says. ConfigError naming FILE:LINE on the first bad one."""
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f'{path}: no such file (a JSONL file of fine-tuning examples)')
  wanted = ' or '.join('{' + ', '.join(f'"{k}"' for k in keys) + '}' for keys in formats.values())
  out = []
  try:
    f = path.open('rb')
  except OSError as e:
    raise ConfigError(f'{path}: cannot be read ({e.strerror})') from None
  with f:
    for n, raw in enumerate(f, 1):
      where = f'{path}:{n}'
      if not raw.strip():
        continue
      try:
        obj = json.loads(raw)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f'{where}: not a JSON object ({e}); each line is one of {wanted}') from None
      if not isinstance(obj, dict):
        raise ConfigError(f'{where}: a JSON {type(obj).__name__}, not an object; each line is one '
                          f'of {wanted}')
      form = next((name for name, keys in formats.items() if all(k in obj for k in keys)), None)
      if form is None:
        raise ConfigError(f"{where}: keys {', '.join(map(repr, obj)) or 'none'}; each line is one "
                          f'of {wanted}')
      out.append({**{k: obj[k] for k in formats[form]}, '_form': form, '_where': where})
  if not out:
    raise ConfigError(f'{path}: no examples (a JSONL file, one JSON object per line)')
  return out


def _text(ex: dict, key: str, empty_ok=False) -> str:
  value = ex[key]
  if not isinstance(value, str):
    raise ConfigError(f'{ex["_where"]}: "{key}" is a {type(value).__name__}, not a string')
  if not empty_ok and not value.strip():
    raise ConfigError(f'{ex["_where"]}: "{key}" is empty')
  return value


# -- supervised fine-tuning -----------------------------------------------------------------------

SFT_FORMATS = {'completion': ('prompt', 'completion'), 'dialogue': ('messages',)}


def sft_tokens(ex: dict, tok) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, trained) of one example: `trained` marks the tokens the loss predicts."""
  if ex['_form'] == 'completion':
    prompt, completion = _text(ex, 'prompt', empty_ok=True), _text(ex, 'completion')
    parts = [(prompt, False), (completion, True)]
  else:
    messages = ex['messages']
    if not isinstance(messages, list) or not messages:
      raise ConfigError(f'{ex["_where"]}: "messages" must be a non-empty list of '
                        '{"role": ..., "content": ...}')
    parts = []
    for m in messages:
      if not isinstance(m, dict) or m.get('role') not in ROLES or not isinstance(m.get('content'), str):
        raise ConfigError(f'{ex["_where"]}: a message is {json.dumps(m)[:80]}; each is '
                          f'{{"role": one of {", ".join(ROLES)}, "content": a string}}')
      # "role: " is context; an assistant's words and the newline after them are trained.
      parts += [(f"{m['role']}: ", False), (m['content'] + '\n', m['role'] == 'assistant')]
    if messages[-1]['role'] != 'assistant' or not messages[-1]['content'].strip():
      raise ConfigError(f'{ex["_where"]}: the last message is not the assistant\'s (with content): '
                        'a dialogue is trained up to its last assistant turn, then end-of-document')
  ids, trained = [], []
  for text, t in parts:
    piece = tok.encode(text) if text else []
    ids.extend(piece)
    trained.extend([t] * len(piece))
  ids.append(tok.eod_id)  # the model learns to stop
  trained.append(True)
  return np.asarray(ids, np.int32), np.asarray(trained, bool)


def pack_sft(examples: list[dict], tok, seq_len: int, overlong: str) -> dict:
  """Examples packed in order into rows of T + 1 tokens: {'tokens', 'segments' [N, T+1],
  'weights' [N, T] (1 where the target, token t + 1, is a trained token of the same example)}.
  An example longer than T + 1 is an error, or (`truncate`) loses its prompt's start and then
  its completion's end."""
  T1 = seq_len + 1
  pieces = []
  for ex in examples:
    ids, trained = sft_tokens(ex, tok)
    if len(ids) > T1:
      if overlong == 'error':
        raise ConfigError(f"{ex['_where']}: {len(ids)} tokens, more than model.seq_len + 1 = {T1}; "
                          "shorten it or set data.overlong='truncate'")
      # The prompt loses its start, keeping at least its last token (from which the first
      # completion token is predicted); then the completion its end.
      first = int(np.argmax(trained))
      cut = min(len(ids) - T1, max(first - 1, 0))
      ids, trained = ids[cut:][:T1], trained[cut:][:T1]
    pieces.append((ids, trained))
  rows, row = [], []
  for piece in pieces:  # greedy, in file order: a row takes examples while they fit
    if sum(len(p[0]) for p in row) + len(piece[0]) > T1:
      rows.append(row)
      row = []
    row.append(piece)
  rows.append(row)
  tokens = np.full((len(rows), T1), tok.eod_id, np.int32)
  segments = np.zeros((len(rows), T1), np.int32)
  trained = np.zeros((len(rows), T1), bool)
  for r, row in enumerate(rows):
    at = 0
    for s, (ids, t) in enumerate(row, 1):
      tokens[r, at:at + len(ids)], segments[r, at:at + len(ids)], trained[r, at:at + len(ids)] = ids, s, t
      at += len(ids)
  same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
  return {'tokens': tokens, 'segments': segments,
          'weights': (trained[:, 1:] & same).astype(np.float32)}


# -- classification -------------------------------------------------------------------------------

CLASSIFY_FORMATS = {'pair': ('text_a', 'text_b', 'label'), 'single': ('text', 'label')}


def classify_rows(examples: list[dict], tok, seq_len: int, labels: tuple, bert: bool,
                  overlong: str) -> dict:
  """{'ids', 'types' [N, T] int32, 'pad' [N, T] bool (True: a real token), 'label' [N] int32}.
  BERT: [CLS] a [SEP] (b [SEP]); GPT: a (newline b), classified at its last token. Text beyond T
  is an error or (`truncate`) cut, the longer text first."""
  index = {str(label): i for i, label in enumerate(labels)}
  special = bert_data.special_ids(tok) if bert else None
  N = len(examples)
  ids = np.zeros((N, seq_len), np.int32)
  types = np.zeros((N, seq_len), np.int32)
  pad = np.zeros((N, seq_len), bool)
  label = np.zeros((N,), np.int32)
  for n, ex in enumerate(examples):
    value = ex['label']
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) not in index:
      raise ConfigError(f"{ex['_where']}: label {json.dumps(value)} is not in data.labels "
                        f"({', '.join(index)})")
    label[n] = index[str(value)]
    texts = [_text(ex, 'text')] if ex['_form'] == 'single' else [_text(ex, 'text_a'), _text(ex, 'text_b')]
    parts = [list(tok.encode(t)) for t in texts]
    newline = list(tok.encode('\n'))
    room = seq_len - (len(parts) + 1 if bert else len(newline) * (len(parts) - 1))
    if sum(map(len, parts)) > room and overlong == 'error':
      raise ConfigError(f"{ex['_where']}: {sum(map(len, parts))} tokens, more than the {room} a "
                        f"row of model.seq_len={seq_len} holds; shorten it or set "
                        "data.overlong='truncate'")
    while sum(map(len, parts)) > room:  # a token at a time from the longer text's end (Megatron)
      max(parts, key=len).pop()
    if bert:
      seq = [special['cls']] + parts[0] + [special['sep']]
      kinds = [0] * len(seq)
      if len(parts) == 2:
        seq += parts[1] + [special['sep']]
        kinds += [1] * (len(parts[1]) + 1)
    else:  # a newline between a pair's texts
      seq = parts[0] + (newline + parts[1] if len(parts) == 2 else [])
      kinds = [0] * len(seq)
    ids[n, :len(seq)], types[n, :len(seq)], pad[n, :len(seq)] = seq, kinds, True
    if bert:
      ids[n, len(seq):] = special['pad']
  return {'ids': ids, 'types': types, 'pad': pad, 'label': label}


CHOICE_FORMATS = {'choice': ('text', 'choices', 'label')}


def choice_rows(examples: list[dict], tok, seq_len: int, bert: bool, overlong: str) -> dict:
  """{'ids', 'types', 'pad' [N, C, T], 'valid' [N, C] (a real choice), 'label' [N]}: one
  classification row per (example, choice); C the most choices any example has."""
  for ex in examples:
    choices, label = ex['choices'], ex['label']
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip()
                                                                    for c in choices):
      raise ConfigError(f"{ex['_where']}: \"choices\" must be a list of at least 2 non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
      raise ConfigError(f"{ex['_where']}: label {json.dumps(label)} is not the index of one of its "
                        f'{len(choices)} choices (0 to {len(choices) - 1})')
  C = max(len(ex['choices']) for ex in examples)
  flat = [{'text_a': ex['text'], 'text_b': c, 'label': 0, '_form': 'pair', '_where': ex['_where']}
          for ex in examples for c in ex['choices'] + [ex['choices'][0]] * (C - len(ex['choices']))]
  rows = classify_rows(flat, tok, seq_len, (0,), bert, overlong)
  N = len(examples)
  return {**{k: rows[k].reshape(N, C, seq_len) for k in ('ids', 'types', 'pad')},
          'valid': np.array([[c < len(ex['choices']) for c in range(C)] for ex in examples]),
          'label': np.array([ex['label'] for ex in examples], np.int32)}


# -- batches --------------------------------------------------------------------------------------

class TaskBatches:
  """Step-indexed global batches of rows of fixed arrays ({name: [N, ...]}): the rows in an
  order reshuffled every epoch, a pure function of (seed, epoch), so resuming needs no state."""

  def __init__(self, arrays: dict, batch_size: int, seed: int, shuffle: bool = True):
    self.arrays, self.batch_size, self.seed, self.shuffle = arrays, batch_size, seed, shuffle
    self.num_rows = len(next(iter(arrays.values())))
    self._orders = {}

  def _row(self, j: int) -> int:
    epoch, i = divmod(j, self.num_rows)
    if not self.shuffle:
      return i
    if epoch not in self._orders:
      self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)}
    return int(self._orders[epoch][i])

  def rows(self, step: int, start: int, stop: int) -> dict:
    picked = [self._row(step * self.batch_size + r) for r in range(start, stop)]
    return {k: v[picked] for k, v in self.arrays.items()}

  def global_batch(self, step: int, shardings: dict) -> dict:
    """Each process builds only its own rows; one global array per field."""
    B = self.batch_size
    name = next(iter(self.arrays))  # every field is split by rows alike
    start, stop = loader.local_rows(shardings[name], (B, *self.arrays[name].shape[1:]))
    local = self.rows(step, start, stop)
    return {k: jax.make_array_from_process_local_data(shardings[k], v, (B, *v.shape[1:]))
            for k, v in local.items()}
