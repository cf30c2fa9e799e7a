"""`python -m shardlm.evaluate --checkpoint DIR --task ppl|lambada|generate|classify --data FILE`.

ppl: sliding-window perplexity, as Megatron-LM evaluated WikiText-103: windows of T tokens
advance by a stride; the first window scores all its tokens, each later one only the
tokens no earlier window scored, with the rest as context. Reports token perplexity,
bits per byte, and word-level perplexity (total loss over the text's whitespace words).

lambada: last-word accuracy, teacher-forced, where a hit needs every token of the last word
to be the model's top prediction (Megatron's strict LAMBADA).

generate: JSONL of {"prompt": ..., "completion": ...}; generates for every prompt in batches
(greedy unless --temperature), stopping at end-of-document or --max-tokens, and scores the
outputs against the completions with --metrics: bleu and chrf (sacrebleu, its signature
printed), rouge (rouge-score's rouge1/2/L/Lsum F-measure), exact (share equal after strip).
--mbr K: minimum-Bayes-risk decoding over the greedy output and K samples per prompt.

classify: a classifier checkpoint (model.kind gpt_cls or bert_cls) on JSONL of {"text", "label"}
or {"text_a", "text_b", "label"}: accuracy, macro-F1, and the most frequent label's accuracy.
"""
import argparse
import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from shardlm import distributed, errors, generate, inference, metrics, runtime
from shardlm.data import tasks
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


@dataclasses.dataclass
class Example:
  """One line of a generation task: the prompt, fed as is, and the reference to score against."""
  line: int
  prompt: str
  reference: str


def generation(model, examples: list[Example], path: Path, metric_names, batch_size: int,
               max_tokens: int = 0, stop_at_newline: bool = False, mbr: int = 0, **sampling):
  """Outputs for every example's prompt, scored against its reference: (result, outputs).

  `max_tokens` 0: as many as the longest prompt leaves room for, up to 200. An output is the
  decoded new tokens without end-of-document, stripped; with `stop_at_newline` only its first
  line. `mbr` K > 0: minimum-Bayes-risk decoding; the candidates are the greedy output and K
  samples (`sampling`, with seeds seed + 1 .. seed + K), and each prompt keeps the one of
  highest ROUGE-L against the others (metrics.mbr_pick).
  """
  tok, T = model.tokenizer, model.cfg.model.seq_len
  prompts = [tok.encode(e.prompt) for e in examples]
  for e, p in zip(examples, prompts):
    if len(p) == 0:
      raise ConfigError(f'{path}:{e.line}: the prompt encodes to no token; give it some text')
  longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
  n, room = examples[longest].line, T - len(prompts[longest])
  if room < 1:
    raise ConfigError(f"{path}:{n}: a prompt of {len(prompts[longest])} tokens leaves no room in the "
                      f"model's {T} positions; shorten it")
  max_tokens = max_tokens or min(200, room)
  if max_tokens > room:
    raise ConfigError(f'{path}:{n}: a prompt of {len(prompts[longest])} tokens + --max-tokens '
                      f"{max_tokens} exceeds the model's {T} positions; shorten the prompt or "
                      f'--max-tokens (at most {room})')
  gen = generate.Generator(model.rt, model.params, tok.eod_id)

  def decoded(**overrides):
    new = generate.in_batches(gen, prompts, batch_size, max_tokens, **{**sampling, **overrides})
    texts = []
    for ids in new:
      text = tok.decode(ids[:-1] if len(ids) and ids[-1] == tok.eod_id else ids).strip()
      texts.append(text.split('\n', 1)[0].strip() if stop_at_newline else text)
    return texts, sum(len(ids) for ids in new)

  if mbr:
    if not sampling.get('temperature'):
      raise ValueError('minimum-Bayes-risk decoding samples: give a temperature > 0')
    runs = [decoded(temperature=0.0)]
    runs += [decoded(seed=sampling.get('seed', 0) + k) for k in range(1, mbr + 1)]
    candidates = list(zip(*(texts for texts, _ in runs)))  # per example: greedy, then samples
    outputs = [c[metrics.mbr_pick(c)] for c in candidates]
    options = {'mbr': mbr, 'mbr_greedy_kept': sum(o == c[0] for o, c in zip(outputs, candidates))}
  else:
    runs = [decoded()]
    outputs, options = runs[0][0], {}
  if sampling.get('no_repeat_ngram'):
    options['no_repeat_ngram'] = sampling['no_repeat_ngram']
  result = {'examples': len(examples), 'max_tokens': max_tokens, **options,
            'generated_tokens': int(sum(n for _, n in runs)),
            **metrics.score(outputs, [e.reference for e in examples], metric_names)}
  return result, outputs


def classification(model, examples: list[dict], batch_size: int) -> dict:
  """Accuracy and macro-F1 (the mean over labels of 2 TP / (2 TP + FP + FN), over the labels
  that occur among references or predictions) of a classifier checkpoint; and the accuracy of
  always answering the data's most frequent label."""
  cfg, kind = model.cfg, runtime.kinds.get(model.cfg.model.kind)
  if kind.rows is None:
    raise ConfigError(f'checkpoint {model.source} holds a {cfg.model.kind} model; --task classify '
                      'takes a classifier (model.kind gpt_cls or bert_cls)')
  labels = tuple(cfg.data.labels)
  rows = kind.rows(examples, model.tokenizer, cfg)
  rt = model.rt
  predict = jax.jit(lambda p, ids, types, pad: jnp.argmax(
      rt.apply(p, ids, types, pad, method='classify'), axis=-1), out_shardings=rt.replicated)
  N, preds = len(examples), []
  for i in range(0, N, batch_size):
    take = np.minimum(np.arange(i, i + batch_size), N - 1)  # the last batch padded with a copy
    preds.append(np.asarray(predict(model.params, *(rows[k][take] for k in ('ids', 'types', 'pad')))))
  pred, gold = np.concatenate(preds)[:N], rows['label']
  f1 = []
  for c in sorted(set(gold) | set(pred)):
    tp, fp, fn = np.sum((pred == c) & (gold == c)), np.sum((pred == c) & (gold != c)), np.sum(
        (pred != c) & (gold == c))
    f1.append(2 * tp / (2 * tp + fp + fn))
  majority = np.bincount(gold).argmax()
  return {'examples': N, 'labels': list(labels), 'accuracy': 100 * float(np.mean(pred == gold)),
          'macro_f1': 100 * float(np.mean(f1)),
          'majority_label': labels[majority], 'majority_accuracy': 100 * float(np.mean(gold == majority))}


def _example(path: Path, n: int, line: str) -> Example:
  """Line `n` of a generation task's JSONL, checked."""
  valid = 'each line is one JSON object {"prompt": "...", "completion": "..."}'
  try:
    obj = json.loads(line)
  except ValueError as e:
    raise ConfigError(f'{path}:{n}: not JSON ({e.msg}, column {e.colno}); {valid}') from None
  if not isinstance(obj, dict):
    raise ConfigError(f'{path}:{n}: a JSON {type(obj).__name__}, not an object; {valid}')
  for key in ('prompt', 'completion'):
    if key not in obj:
      raise ConfigError(f'{path}:{n}: no "{key}" key (it has {", ".join(map(repr, obj)) or "none"}); '
                        f'{valid}')
    if not isinstance(obj[key], str):
      raise ConfigError(f'{path}:{n}: "{key}" is a JSON {type(obj[key]).__name__}, not a string; {valid}')
  if not obj['prompt']:
    raise ConfigError(f'{path}:{n}: empty "prompt"; generation needs some text to continue')
  if not obj['completion'].strip():
    raise ConfigError(f'{path}:{n}: empty "completion"; the reference to score against needs text')
  return Example(n, obj['prompt'], obj['completion'].strip())


def read_data(path: Path, task: str):
  """The --data file, checked: UTF-8 text for ppl, JSONL of {"text": ...} for lambada, JSONL of
  {"prompt": ..., "completion": ...} for generate (every line, before anything is loaded)."""
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
  lines = [(n, line) for n, line in enumerate(content.split('\n'), 1) if line.strip()]  # JSONL: \n only
  if task == 'generate':
    return [_example(path, n, line) for n, line in lines]
  examples = []
  for n, line in lines:
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


GENERATE_FLAGS = ('metrics', 'max_tokens', 'stop_at_newline', 'out', 'temperature', 'top_k', 'top_p',
                  'seed', 'no_repeat_ngram', 'mbr')


def main(argv=None):
  errors.run_cli(lambda a: distributed.run(lambda: _main(a)), argv)


def _main(argv):
  parser = errors.ArgumentParser(prog='python -m shardlm.evaluate', description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='run or checkpoint directory')
  parser.add_argument('--task', choices=('ppl', 'lambada', 'generate', 'classify'), required=True)
  parser.add_argument('--data', required=True, help='ppl: a text file; lambada: JSONL with "text"; '
                      'generate: JSONL with "prompt" and "completion"; classify: JSONL with '
                      '"text" (or "text_a", "text_b") and "label"')
  parser.add_argument('--stride', type=int, default=None, help='ppl window stride (default T/2)')
  parser.add_argument('--batch-size', type=int, default=8)
  gen = parser.add_argument_group('--task generate')  # the flags of GENERATE_FLAGS
  gen.add_argument('--metrics', default='bleu,rouge,exact',
                   help=f'comma-separated, of {",".join(metrics.METRICS)}')
  gen.add_argument('--max-tokens', type=int, default=0,
                   help='new tokens per prompt (default: up to 200, as many as the positions allow)')
  gen.add_argument('--stop-at-newline', action='store_true', help='keep only the first line of an output')
  gen.add_argument('--out', help='write the generations here as JSONL (prompt, reference, output)')
  gen.add_argument('--temperature', type=float, default=0.0, help='0 (default) for greedy')
  gen.add_argument('--top-k', type=int, default=0)
  gen.add_argument('--top-p', type=float, default=1.0)
  gen.add_argument('--seed', type=int, default=0)
  generate.add_no_repeat_ngram(gen)
  gen.add_argument('--mbr', type=int, default=0, metavar='K',
                   help='minimum-Bayes-risk decoding: the greedy output and K samples at --temperature '
                   '(> 0; 0.7 is a good start) per prompt, keeping the one of highest ROUGE-L against '
                   'the others (0, the default: off)')
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
  given = [d for d in GENERATE_FLAGS if getattr(args, d) != parser.get_default(d)]
  if args.task != 'generate' and given:
    errors.warn(f'--{given[0].replace("_", "-")} is for --task generate; --task {args.task} ignores it')
  names = [m.strip() for m in args.metrics.split(',') if m.strip()]
  if args.task == 'generate':
    generate.check_sampling(args)
    if args.mbr < 0 or args.mbr == 1:
      raise ConfigError(f'--mbr {args.mbr} must be 0 (off) or >= 2 (with one sample, the greedy '
                        'output always ties and is kept)')
    if args.mbr and args.temperature == 0:
      raise ConfigError(f'--mbr {args.mbr}: its samples need --temperature > 0 (0.7 is a good start)')
    if args.seed + args.mbr >= 2**63:
      raise ConfigError(f"--seed {args.seed} + --mbr {args.mbr}: the samples' seeds must fit in 64 bits")
    unknown = [m for m in names if m not in metrics.METRICS]
    if unknown or not names:
      raise ConfigError(f'--metrics {args.metrics!r}: ' + (f'no metric {unknown[0]!r}; ' if unknown else '')
                        + f'give a comma-separated list of {", ".join(metrics.METRICS)}')
    out = Path(args.out or '.')
    if args.out and (out.is_dir() or not out.parent.is_dir()):
      raise ConfigError(f'--out {out}: ' + ('a directory; give a file name' if out.is_dir() else
                                            f'no directory {out.parent}'))
  path = Path(args.data)
  if args.task == 'classify':
    data = tasks.read_jsonl(path, tasks.CLASSIFY_FORMATS)
  else:
    data = read_data(path, args.task)
  model = inference.load(args.checkpoint, overrides, causal=args.task != 'classify')
  T = model.cfg.model.seq_len
  outputs = None
  if args.task == 'ppl':
    tokens = model.tokenizer.encode(data)
    if len(tokens) < 2:
      raise ConfigError(f'--data {path} has fewer than 2 tokens')
    result = perplexity(model.score, tokens, T, args.stride or T // 2, args.batch_size,
                        len(data.encode('utf-8')), max(len(data.split()), 1))
  elif args.task == 'lambada':
    result = lambada(model.score, data, model.tokenizer, T, args.batch_size)
  elif args.task == 'classify':
    result = classification(model, data, args.batch_size)
  else:
    if args.top_k > model.cfg.model.vocab_size:
      raise ConfigError(f'--top-k {args.top_k} exceeds the vocabulary of {model.cfg.model.vocab_size}')
    result, outputs = generation(model, data, path, names, args.batch_size, args.max_tokens,
                                 args.stop_at_newline, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                 no_repeat_ngram=args.no_repeat_ngram, mbr=args.mbr)
  if jax.process_index() != 0:  # many processes: the first one prints and writes
    return
  if args.out and outputs is not None:
    write_outputs(Path(args.out), data, outputs)
  print(json.dumps({'task': args.task, 'data': str(args.data), 'checkpoint': str(model.source),
                    **result}, indent=2))


def write_outputs(out: Path, examples: list[Example], outputs: list[str]) -> None:
  """JSONL of prompt, reference and output per example, whole or not at all."""
  tmp = out.with_name(out.name + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    for e, o in zip(examples, outputs):
      f.write(json.dumps({'prompt': e.prompt, 'reference': e.reference, 'output': o},
                         ensure_ascii=False) + '\n')
  os.replace(tmp, out)


if __name__ == '__main__':
  main()
