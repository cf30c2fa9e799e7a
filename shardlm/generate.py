"""`python -m shardlm.generate --checkpoint DIR --prompt "..."`: text from a trained GPT.

Decoding keeps a key/value cache (split over heads on the model axis), so each new token costs
one position, not the whole prefix. Greedy (--temperature 0) or sampled with temperature,
top-k and top-p; --no-repeat-ngram N forbids a token that would repeat an N-gram of the output
(fairseq's and Hugging Face's n-gram blocking, over the new tokens only, so that a prompt's words
can still be copied); a batch of prompts from a file (one per line); stops at end-of-document or
after --max-tokens; streams the first prompt's tokens as they come.
"""
import argparse
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from shardlm import distributed, errors, inference
from shardlm.errors import ConfigError
from shardlm.model.gpt import mask_padding


class NgramBlocker:
  """The tokens each row may not write next: those that would complete an n-gram the row already
  holds (for n = 1, every token it holds). Kept up to date a token at a time, so a step costs
  O(batch), not O(batch x length)."""

  def __init__(self, rows: int, n: int):
    self.n, self.out = n, [[] for _ in range(rows)]
    self.follows = [{} for _ in range(rows)]  # per row: (n-1)-gram -> the tokens seen after it

  def add(self, row: int, token: int) -> None:
    out = self.out[row]
    out.append(token)
    if len(out) >= self.n:
      self.follows[row].setdefault(tuple(out[len(out) - self.n:-1]), set()).add(token)

  def banned(self, width: int) -> np.ndarray:
    """[rows, width] bool."""
    banned = np.zeros((len(self.out), width), bool)
    for b, out in enumerate(self.out):
      after = self.follows[b].get(tuple(out[len(out) - self.n + 1:]) if self.n > 1 else ())
      if after:
        banned[b, list(after)] = True
    return banned


def repeated_ngrams(outputs: list[list[int]], n: int, width: int) -> np.ndarray:
  """NgramBlocker's [B, width] answer for whole outputs at once."""
  blocker = NgramBlocker(len(outputs), n)
  for b, out in enumerate(outputs):
    for token in out:
      blocker.add(b, token)
  return blocker.banned(width)


def sample(logits_bv, key, temperature: float, top_k: int, top_p: float, banned_bv=None):
  """One token per row. Padded vocabulary entries must already be masked (-1e9); `banned_bv`
  (bool, optional) masks more."""
  if banned_bv is not None:
    logits_bv = jnp.where(banned_bv, -1e9, logits_bv)
  if temperature <= 0:
    return jnp.argmax(logits_bv, axis=-1)
  logits_bv = logits_bv / temperature
  if top_k:
    kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
  if top_p < 1:
    # Keep the smallest set of most likely tokens whose probability reaches top_p.
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    cum_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
    cutoff = jnp.take_along_axis(sorted_bv, jnp.sum(cum_bv < top_p, axis=-1, keepdims=True), -1)
    logits_bv = jnp.where(logits_bv < cutoff, -jnp.inf, logits_bv)
  return jax.random.categorical(key, logits_bv, axis=-1)


class Generator:
  """Jitted prefill and one-token decode steps for a GPT on a mesh."""

  def __init__(self, rt, params, eod_id: int):
    """`rt`: the shardlm.runtime.Runtime of a causal LM; `params` on its mesh."""
    self.params, self.eod_id, self.seq_len = params, eod_id, rt.model_config.seq_len
    vocab_size = rt.model_config.vocab_size

    def cached(params, ids_bt, cache, decode):
      logits_btv, cache = rt.apply(params, ids_bt, cache, decode)
      return mask_padding(logits_btv[:, -1], vocab_size), cache

    def full(params, ids_bt, pos):
      # No cache: the whole sequence again; causal, so what lies past `pos` changes nothing.
      logits_btv = rt.apply(params, ids_bt)
      return mask_padding(jax.lax.dynamic_index_in_dim(logits_btv, pos - 1, 1, False), vocab_size)

    def init_cache(params, batch, length):
      return rt.apply(params, batch, length, method='init_cache')

    def next_token(logits_bv, seed, t, temperature, top_k, top_p, banned_bv):
      return sample(logits_bv, jax.random.fold_in(jax.random.key(seed), t), temperature, top_k, top_p,
                    banned_bv)

    # Inputs go in as numpy (the same in every process) and the sampled tokens come out
    # replicated, so that any process of a multi-process job can read them.
    self._cached = jax.jit(cached, donate_argnums=2)
    self._full = jax.jit(full)
    self._init_cache = jax.jit(init_cache, static_argnums=(1, 2))
    self._next = jax.jit(next_token, static_argnums=(1, 3, 4, 5), out_shardings=rt.replicated)

  def __call__(self, prompts: list[np.ndarray], max_tokens: int, temperature=0.0, top_k=0,
               top_p=1.0, seed=0, use_cache=True, on_token=None, prompt_len=0,
               no_repeat_ngram=0) -> list[np.ndarray]:
    """New tokens per prompt (up to end-of-document, included, or max_tokens). Prompts are
    left-padded to the longest, or to `prompt_len` if that is longer. `no_repeat_ngram` N > 0:
    no row's new tokens repeat an N-gram of its new tokens."""
    B, P = len(prompts), max(prompt_len, *(len(p) for p in prompts))
    S = P + max_tokens
    if S > self.seq_len:
      raise ConfigError(f'prompt of {P} tokens + {max_tokens} new tokens exceeds the model\'s '
                        f'{self.seq_len} positions; shorten the prompt or --max-tokens')
    ids = np.zeros((B, S), np.int32)  # left-padded: every row's next token is at the same place
    for b, p in enumerate(prompts):
      ids[b, P - len(p):P] = p
    start = np.asarray([P - len(p) for p in prompts], np.int32)
    done = np.zeros(B, bool)
    out = [[] for _ in range(B)]
    blocker = NgramBlocker(B, no_repeat_ngram) if no_repeat_ngram else None
    if not use_cache and any(len(p) != P for p in prompts):
      raise ValueError('decoding without the cache needs prompts of one length')
    cache = self._init_cache(self.params, B, S) if use_cache else None
    for t in range(max_tokens):
      pos = P + t
      if use_cache:
        first = 0 if t == 0 else pos - 1  # the prefill takes the whole prompt at once
        logits, cache = self._cached(self.params, ids[:, first:pos], cache,
                                     {'pos': np.int32(first), 'start': start})
      else:
        logits = self._full(self.params, ids, np.int32(pos))
      # Worked out on the host, the same in every process: the rows' own tokens so far.
      banned_bv = blocker.banned(logits.shape[-1]) if blocker is not None else None
      token = np.asarray(self._next(logits, int(seed), np.int32(t), float(temperature),
                                    int(top_k), float(top_p), banned_bv))
      ids[:, pos] = token
      for b in range(B):
        if not done[b]:
          out[b].append(int(token[b]))
          if blocker is not None:
            blocker.add(b, int(token[b]))
          done[b] = token[b] == self.eod_id
      if on_token:
        on_token(int(token[0]), bool(done[0]) and out[0][-1] == self.eod_id)
      if done.all():
        break
    return [np.asarray(o, np.int32) for o in out]


def in_batches(gen: Generator, prompts: list[np.ndarray], batch_size: int, max_tokens: int,
               **sampling) -> list[np.ndarray]:
  """`gen` over many prompts, `batch_size` at a time, in one shape: every batch is left-padded
  to the longest prompt of all and the last one filled up with copies, so one program compiles."""
  P, out = max(len(p) for p in prompts), []
  batch_size = min(batch_size, len(prompts))
  for i in range(0, len(prompts), batch_size):
    chunk = prompts[i:i + batch_size]
    chunk += [chunk[0]] * (batch_size - len(chunk))
    out += gen(chunk, max_tokens, prompt_len=P, **sampling)
  return out[:len(prompts)]


def read_prompts(args) -> list[str]:
  """The prompts of --prompt or --prompts, checked: a readable UTF-8 file with at least one."""
  if args.prompt is not None:
    texts = [args.prompt]
  else:
    try:
      with open(args.prompts, encoding='utf-8') as f:
        texts = [line for line in f.read().splitlines() if line.strip()]
    except OSError as e:
      raise ConfigError(f'--prompts {args.prompts}: {e.strerror}') from None
    except UnicodeDecodeError as e:
      raise ConfigError(f'--prompts {args.prompts}: not UTF-8 text (byte {e.start})') from None
    if not texts:
      raise ConfigError(f'--prompts {args.prompts} holds no prompt (one per line, blank lines skipped)')
  # "\n" and "\t" in a shell argument or a one-line prompt stand for a newline and a tab.
  return [t.replace('\\n', '\n').replace('\\t', '\t') for t in texts]


def add_no_repeat_ngram(parser) -> None:
  parser.add_argument('--no-repeat-ngram', type=int, default=0, metavar='N',
                      help='never repeat an N-gram of the new tokens (0, the default: off)')


def check_sampling(args) -> None:
  """Numbers finite and in range, before anything is loaded."""
  if not math.isfinite(args.temperature) or args.temperature < 0:
    raise ConfigError(f'--temperature {args.temperature} must be a finite number >= 0 (0: greedy)')
  if args.max_tokens < 0:
    raise ConfigError(f'--max-tokens {args.max_tokens} must be >= 1 (0: as many as fit, up to 200)')
  if args.top_k < 0:
    raise ConfigError(f'--top-k {args.top_k} must be >= 0 (0: off)')
  if not -2**63 < args.seed < 2**63:
    raise ConfigError(f'--seed {args.seed} must fit in 64 bits')
  if args.no_repeat_ngram < 0:
    raise ConfigError(f'--no-repeat-ngram {args.no_repeat_ngram} must be >= 0 (0: off)')
  if not 0 < args.top_p <= 1:  # nan fails this too
    raise ConfigError(f'--top-p {args.top_p} must lie in (0, 1] (1: off)')
  if args.temperature == 0 and (args.top_k or args.top_p < 1):
    errors.warn('--top-k and --top-p do nothing with --temperature 0 (greedy decoding)')


def main(argv=None):
  errors.run_cli(lambda a: distributed.run(lambda: _main(a)), argv)


def _main(argv):
  parser = errors.ArgumentParser(prog='python -m shardlm.generate', description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='run or checkpoint directory')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--prompt', help='one prompt')
  source.add_argument('--prompts', help='a file of prompts, one per line')
  parser.add_argument('--max-tokens', type=int, default=0,
                      help='new tokens per prompt (default: up to 200, as many as the positions allow)')
  parser.add_argument('--temperature', type=float, default=0.8, help='0 for greedy')
  parser.add_argument('--top-k', type=int, default=0)
  parser.add_argument('--top-p', type=float, default=1.0)
  parser.add_argument('--seed', type=int, default=0)
  add_no_repeat_ngram(parser)
  args, overrides = parser.parse_known_args(argv)
  check_sampling(args)
  texts = read_prompts(args)
  model = inference.load(args.checkpoint, overrides)
  if args.top_k > model.cfg.model.vocab_size:
    raise ConfigError(f'--top-k {args.top_k} exceeds the vocabulary of {model.cfg.model.vocab_size}')
  prompts = [model.tokenizer.encode(t) for t in texts]
  if any(len(p) == 0 for p in prompts):
    raise ConfigError('every prompt needs at least one token')
  room = model.cfg.model.seq_len - max(len(p) for p in prompts)
  if room < 1:
    raise ConfigError(f'a prompt of {max(len(p) for p in prompts)} tokens leaves no room in the '
                      f"model's {model.cfg.model.seq_len} positions; shorten the prompt")
  max_tokens = args.max_tokens or min(200, room)
  if max_tokens > room:
    raise ConfigError(f'a prompt of {model.cfg.model.seq_len - room} tokens + {max_tokens} new tokens '
                      f"exceeds the model's {model.cfg.model.seq_len} positions; shorten the prompt "
                      'or --max-tokens')
  gen = Generator(model.rt, model.params, model.tokenizer.eod_id)
  show = jax.process_index() == 0  # many processes: the first one prints
  stream = show and len(texts) == 1
  if stream:
    print(texts[0], end='', flush=True)
  emitted = []

  def on_token(token, eod):  # print whatever decodes cleanly so far
    if stream and not eod:
      emitted.append(token)
      text = model.tokenizer.decode(emitted)
      if not text.endswith('\ufffd'):
        print(text, end='', flush=True)
        emitted.clear()

  t0 = time.perf_counter()
  outs = gen(prompts, max_tokens, args.temperature, args.top_k, args.top_p, args.seed,
             on_token=on_token, no_repeat_ngram=args.no_repeat_ngram)
  dt = time.perf_counter() - t0
  if not show:
    return
  if stream:
    print()
  else:
    for text, out in zip(texts, outs):
      print(f'--- {text!r}\n{text}{model.tokenizer.decode(out)}')
  n = sum(len(o) for o in outs)
  print(f'[{n} tokens in {dt:.2f}s, {n / dt:.1f} tokens/s]', file=sys.stderr)


if __name__ == '__main__':
  main()
