"""BERT batches from the same step-indexed samples: sentence-order pairs and masked-LM targets.

Sample j of the GPT loader (T-3 tokens of the packed corpus) becomes one BERT row. Its
sentences (lines, for code: units ending in a newline, `.`, `!`, `?` or end-of-document) are
kept whole: the partial first and last ones are dropped, and the rest are cut at a random
sentence boundary into segments A and B, kept in order or swapped (the sentence-order label, as
in ALBERT and Megatron-LM's BERT), laid out as [CLS] A [SEP] B [SEP] and padded to T. Whole
sentences on both sides leave no clue to the order but the text itself (a cut mid-line would
let the model read the order off the byte before [SEP]). A sample with fewer than three
boundaries is cut at a random token instead. 15% of the segment tokens (whole words,
optionally) are chosen; of those 80% become [MASK], 10% a random token, 10% stay. Every choice
is drawn from (seed, j), so a batch is a pure function of the step.
"""
import jax
import numpy as np

from shardlm.data import loader
from shardlm.errors import ConfigError

SPECIALS = ('cls', 'sep', 'mask', 'pad')
_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True


def special_ids(tokenizer) -> dict:
  """[CLS] [SEP] [MASK] [PAD] from the tokenizer, or, for the byte tokenizer, the next 4 ids."""
  have = getattr(tokenizer, 'special_ids', {})
  if all(k in have for k in SPECIALS):
    return {k: have[k] for k in SPECIALS}
  if tokenizer.name != 'byte':
    raise ConfigError(f'tokenizer {tokenizer.name} lacks BERT special tokens '
                      '[CLS] [SEP] [MASK] [PAD]; use a WordPiece tokenizer.json that has them')
  return {k: tokenizer.vocab_size + i for i, k in enumerate(SPECIALS)}


def _sentence_ends(tokenizer) -> np.ndarray:
  """[vocab] bool: the tokens after which a new sentence (or line) starts."""
  if tokenizer.name == 'byte':
    ends = np.zeros(tokenizer.vocab_size, bool)
    ends[[ord('\n'), tokenizer.eod_id]] = True
    return ends
  texts = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
  ends = np.array([t.endswith(('\n', '.', '!', '?')) for t in texts])
  ends[tokenizer.eod_id] = True
  return ends


def vocab_size(tokenizer) -> int:
  """Ids a BERT model must embed: the tokenizer's, plus the 4 special ids added to the byte one."""
  return max(max(special_ids(tokenizer).values()) + 1, tokenizer.vocab_size)


class BertBatches:
  """Global BERT batches (a dict of [B, T] arrays and the [B] order labels) for each step."""

  def __init__(self, samples, tokenizer, seq_len: int, seed: int, mask_prob=0.15,
               whole_word=False):
    if samples.seq_len + 1 != seq_len - 3:
      raise ValueError('BERT rows need samples of T-3 tokens')
    self.samples, self.T, self.seed, self.mask_prob = samples, seq_len, seed, mask_prob
    self.batch_size = samples.batch_size
    self.ids = special_ids(tokenizer)
    self.num_real = tokenizer.vocab_size  # random replacements come from the real vocabulary
    self.vocab_size = vocab_size(tokenizer)
    self.ends_sentence = _sentence_ends(tokenizer)
    self.continues = None
    if whole_word:
      if tokenizer.name == 'byte':
        self.continues = 'bytes'
      else:
        vocab = tokenizer.vocab()
        self.continues = np.array([vocab.get(i, '').startswith('##') for i in range(self.num_real)])

  def _word_starts(self, tokens) -> np.ndarray:
    if self.continues is None:
      return np.ones(len(tokens), bool)
    if isinstance(self.continues, str):  # bytes: a word starts after whitespace
      space = _WHITESPACE[np.minimum(tokens, 255)] | (tokens > 255)
      return ~space & np.concatenate([[True], space[:-1]]) | space
    return ~self.continues[np.minimum(tokens, self.num_real - 1)]

  def example(self, j: int) -> dict:
    rng = np.random.default_rng([self.seed, j])
    tokens = np.asarray(self.samples.sample(j), np.int64)
    starts = np.flatnonzero(self.ends_sentence[np.minimum(tokens, len(self.ends_sentence) - 1)]) + 1
    starts = starts[starts < len(tokens)]
    if len(starts) >= 3:  # whole sentences: from the first start to the last, cut at one between
      cut = int(rng.choice(starts[1:-1]))
      a, b = tokens[starts[0]:cut], tokens[cut:starts[-1]]
    else:
      cut = int(rng.integers(1, len(tokens)))
      a, b = tokens[:cut], tokens[cut:]
    order = int(rng.random() < 0.5)
    if order:
      a, b = b, a
    T, ids = self.T, self.ids
    row = np.full(T, ids['pad'], np.int64)
    seq = np.concatenate([[ids['cls']], a, [ids['sep']], b, [ids['sep']]])
    row[:len(seq)] = seq
    types = np.zeros(T, np.int32)
    types[len(a) + 2:len(seq)] = 1
    # Choose masked positions among segment tokens, whole words at a time.
    positions = np.concatenate([1 + np.arange(len(a)), len(a) + 2 + np.arange(len(b))])
    body = row[positions]
    starts = np.flatnonzero(self._word_starts(body) | (np.arange(len(body)) == 0))
    words = np.split(np.arange(len(body)), starts[1:])
    budget = max(1, int(round(self.mask_prob * len(body))))
    chosen = []
    for w in rng.permutation(len(words)):
      if len(chosen) >= budget:
        break
      chosen.extend(words[w])
    chosen = positions[np.sort(np.asarray(chosen, np.int64))]
    labels = row.copy()
    mlm_mask = np.zeros(T, np.float32)
    mlm_mask[chosen] = 1
    roll = rng.random(len(chosen))
    ids_out = row.copy()
    ids_out[chosen[roll < 0.8]] = ids['mask']
    random_pos = chosen[(roll >= 0.8) & (roll < 0.9)]
    ids_out[random_pos] = rng.integers(0, self.num_real, len(random_pos))
    return {'ids': ids_out.astype(np.int32), 'types': types, 'pad': np.arange(T) < len(seq),
            'labels': labels.astype(np.int32), 'mlm_mask': mlm_mask, 'order': np.int32(order)}

  def rows(self, step: int, start: int, stop: int) -> dict:
    examples = [self.example(step * self.batch_size + r) for r in range(start, stop)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  def global_batch(self, step: int, shardings: dict) -> dict:
    """Each process builds only its own rows; one global array per field."""
    B = self.batch_size
    start, stop = loader.local_rows(shardings['ids'], (B, self.T))
    local = self.rows(step, start, stop)
    return {k: jax.make_array_from_process_local_data(shardings[k], v, (B, *v.shape[1:]))
            for k, v in local.items()}
