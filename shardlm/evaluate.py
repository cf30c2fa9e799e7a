"""`python -m shardlm.evaluate --checkpoint DIR --task ppl|lambada --data FILE`: zero-shot evaluation.

ppl: sliding-window perplexity, as Megatron-LM evaluated WikiText-103: windows of T tokens
advance by a stride; the first window scores all its tokens, each later one only the
tokens no earlier window scored, with the rest as context. Reports token perplexity,
bits per byte, and word-level perplexity (total loss over the text's whitespace words).

lambada: last-word accuracy, teacher-forced, where a hit needs every token of the last word
to be the model's top prediction (Megatron's strict LAMBADA).
"""
import argparse
import json
import math
from pathlib import Path

import jax
import numpy as np

from shardlm import distributed, errors, inference
from shardlm.errors import ConfigError


def windows(num_tokens: int, seq_len: int, stride: int):
  """(start, first scored target) per window over tokens[0:num_tokens]; targets are 1..N-1.

  Window k feeds tokens [start, start+T) and predicts [start+1, start+T+1); it scores the
  targets from `first` on, all of which earlier windows left unscored.
  """
  if not 0 < stride <= seq_len:
    raise ConfigError(f'--stride {stride} must lie in 1..{seq_len} (the window)')
  out, scored_to, start = [], 0, 0  # targets 1..scored_to are done
  while scored_to < num_tokens - 1:
    out.append((start, scored_to + 1))
    scored_to = min(start + seq_len, num_tokens - 1)
    start += stride
  return out


def perplexity(score, tokens: np.ndarray, seq_len: int, stride: int, batch_size: int,
               num_bytes: int, num_words: int) -> dict:
  """`score(tokens [B, T+1]) -> (nll [B, T], hit [B, T])` runs the model; numpy in and out."""
  wins = windows(len(tokens), seq_len, stride)
  total, count = 0.0, 0
  for i in range(0, len(wins), batch_size):
    chunk = wins[i:i + batch_size]
    rows = np.zeros((batch_size, seq_len + 1), np.int32)
    weights = np.zeros((batch_size, seq_len), bool)
    for r, (start, first) in enumerate(chunk):
      piece = tokens[start:start + seq_len + 1]
      rows[r, :len(piece)] = piece
      target_index = start + 1 + np.arange(seq_len)  # which token each column predicts
      weights[r] = (target_index >= first) & (target_index < len(tokens))
    nll, _ = score(rows)
    total += float(np.sum(np.where(weights, nll, 0.0), dtype=np.float64))
    count += int(weights.sum())
  return {'tokens_scored': count, 'token_ppl': math.exp(total / count),
          'bits_per_byte': total / math.log(2) / num_bytes,
          'word_ppl': math.exp(total / num_words), 'loss': total / count}


def lambada(score, examples: list[str], tokenizer, seq_len: int, batch_size: int) -> dict:
  """Strict last-word accuracy: every token of the last word must be predicted exactly."""
  hits = 0
  for i in range(0, len(examples), batch_size):
    chunk = examples[i:i + batch_size]
    rows = np.zeros((batch_size, seq_len + 1), np.int32)
    target = np.zeros((batch_size, seq_len), bool)
    for r, text in enumerate(chunk):
      context, word = text.rstrip().rsplit(' ', 1)
      ctx, tgt = tokenizer.encode(context), tokenizer.encode(' ' + word)
      seq = np.concatenate([ctx, tgt])[-(seq_len + 1):]  # keep the end: the word must fit
      rows[r, :len(seq)] = seq
      target[r, len(seq) - len(tgt) - 1:len(seq) - 1] = True
    _, hit = score(rows)
    hits += int(np.sum(np.all(hit | ~target, axis=1)[:len(chunk)]))
  return {'examples': len(examples), 'accuracy': hits / len(examples)}


def read_data(path: Path, task: str):
  """The --data file, checked: UTF-8 text for ppl, JSONL of {"text": ...} for lambada."""
  if not path.is_file():
    raise ConfigError(f'--data {path}: no such file')
  try:
    content = path.read_text(encoding='utf-8')
  except UnicodeDecodeError as e:
    raise ConfigError(f'--data {path}: not UTF-8 text (byte {e.start})') from None
  if not content.strip():
    raise ConfigError(f'--data {path} is empty')
  if task == 'ppl':
    return content
  examples = []
  for n, line in enumerate(content.splitlines(), 1):
    if line.strip():
      try:
        example = json.loads(line)['text']
      except (ValueError, KeyError, TypeError):
        example = None
      if not isinstance(example, str):
        raise ConfigError(f'{path}:{n}: not a JSON object with a "text" string')
      examples.append(example)
  if any(' ' not in e.strip() for e in examples):
    raise ConfigError(f'{path}: every example needs a context and a last word')
  return examples


def main(argv=None):
  errors.run_cli(lambda a: distributed.run(lambda: _main(a)), argv)


def _main(argv):
  parser = errors.ArgumentParser(prog='python -m shardlm.evaluate', description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='run or checkpoint directory')
  parser.add_argument('--task', choices=('ppl', 'lambada'), required=True)
  parser.add_argument('--data', required=True, help='ppl: a text file; lambada: JSONL with "text"')
  parser.add_argument('--stride', type=int, default=None, help='ppl window stride (default T/2)')
  parser.add_argument('--batch-size', type=int, default=8)
  args, overrides = parser.parse_known_args(argv)
  if args.batch_size < 1:
    raise ConfigError(f'--batch-size {args.batch_size} must be >= 1')
  if args.stride is not None and args.stride < 0:
    raise ConfigError(f'--stride {args.stride} must be >= 1 (leave it out for half the window)')
  if args.stride == 0:
    errors.warn('--stride 0 scores with the default stride, half the window; leave it out, or give '
                'a stride >= 1')
  if args.stride is not None and args.task != 'ppl':
    errors.warn(f'--stride is for --task ppl; --task {args.task} ignores it')
  path = Path(args.data)
  data = read_data(path, args.task)
  model = inference.load(args.checkpoint, overrides)
  T = model.cfg.model.seq_len
  if args.task == 'ppl':
    tokens = model.tokenizer.encode(data)
    if len(tokens) < 2:
      raise ConfigError(f'--data {path} has fewer than 2 tokens')
    result = perplexity(model.score, tokens, T, args.stride or T // 2, args.batch_size,
                        len(data.encode('utf-8')), max(len(data.split()), 1))
  else:
    result = lambada(model.score, data, model.tokenizer, T, args.batch_size)
  if jax.process_index() == 0:  # many processes: the first one prints
    print(json.dumps({'task': args.task, 'data': str(args.data), 'checkpoint': str(model.source),
                      **result}, indent=2))


if __name__ == '__main__':
  main()
