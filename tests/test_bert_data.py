"""BERT batches: layout, sentence-order pairs, masking rates, determinism; the SOP head learns."""
import jax
import numpy as np
import pytest
from conftest import run_steps

from shardlm import config
from shardlm.data import bert, loader
from shardlm.data.tokenizer import get_tokenizer

T = 64


@pytest.fixture(scope='module')
def batches():
  # Lines of 5-12 bytes with a line number in them, packed as the loader packs a corpus.
  rng = np.random.default_rng(0)
  text = ''.join(f'{i:04d} ' + 'abcdefgh'[:rng.integers(0, 8)] + '\n' for i in range(20000))
  stream = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
  tok = get_tokenizer('byte')
  samples = loader.Batches(stream, T - 4, batch_size=16, seed=0)
  return bert.BertBatches(samples, tok, T, seed=0), samples, tok


def test_rows_are_cls_a_sep_b_sep_of_whole_lines(batches):
  bb, samples, tok = batches
  ids = bb.ids
  for j in range(64):
    e, original = bb.example(j), samples.sample(j)
    labels, types, pad = e['labels'], e['types'], e['pad']
    n = int(pad.sum())
    assert labels[0] == ids['cls'] and labels[n - 1] == ids['sep'] and (labels[n:] == ids['pad']).all()
    (first_sep,) = np.flatnonzero(labels[:n - 1] == ids['sep'])
    a, b = labels[1:first_sep], labels[first_sep + 1:n - 1]
    assert (types[:first_sep + 1] == 0).all() and (types[first_sep + 1:n] == 1).all()
    # Both segments are whole lines; put back in order they are one stretch of the sample.
    assert a[-1] == ord('\n') and b[-1] == ord('\n')
    first, second = (b, a) if e['order'] else (a, b)
    joined = np.concatenate([first, second])
    starts = [s for s in range(len(original) - len(joined) + 1)
              if (original[s:s + len(joined)] == joined).all()]
    assert starts and (starts[0] == 0 or original[starts[0] - 1] == ord('\n'))


def test_masking_rates_and_determinism(batches):
  bb, _, tok = batches
  rows = bb.rows(0, 0, 16)
  rows2 = bb.rows(0, 0, 16)
  assert all((rows[k] == rows2[k]).all() for k in rows)  # a pure function of the step
  other = bb.rows(1, 0, 16)
  assert not (rows['ids'] == other['ids']).all()
  many = [bb.example(j) for j in range(2000)]
  chosen = sum(e['mlm_mask'].sum() for e in many)
  body = sum(e['pad'].sum() - 3 for e in many)  # segment tokens: all but [CLS] and two [SEP]
  assert abs(chosen / body - 0.15) < 0.01
  masked = sum(((e['ids'] == bb.ids['mask']) & (e['mlm_mask'] > 0)).sum() for e in many)
  kept = sum(((e['ids'] == e['labels']) & (e['mlm_mask'] > 0)).sum() for e in many)
  assert abs(masked / chosen - 0.8) < 0.02
  assert 0.08 < kept / chosen < 0.13  # 10% kept, plus random draws that hit the same token
  assert 0.45 < np.mean([e['order'] for e in many]) < 0.55
  # Special tokens and padding are never chosen.
  assert all(e['mlm_mask'][np.isin(e['labels'], list(bb.ids.values()))].sum() == 0 for e in many)


def test_whole_word_masking_takes_whole_words(batches):
  _, samples, tok = batches
  bb = bert.BertBatches(samples, tok, T, seed=0, whole_word=True)
  for j in range(200):
    e = bb.example(j)
    m, labels = e['mlm_mask'] > 0, e['labels']
    word = (labels < 256) & ~np.isin(labels, [32, 10])
    for i in np.flatnonzero(m & word):
      # A chosen letter's neighbours in the same word are chosen too.
      for k in (i - 1, i + 1):
        if word[k]:
          assert m[k], (j, i, k)


def test_sentence_order_head_learns_a_visible_order():
  """The SOP path (pooler, head, loss, gradients) learns when the order can be seen: segment A
  is drawn from ids 0-99 and B from 100-199, so a swapped row shows the high ids first."""
  B = 16
  cfg = config.load('bert_tiny')
  for key, value in {'model.num_layers': 2, 'model.seq_len': 32, 'data.batch_size': B,
                     'optimizer.warmup_steps': 1, 'optimizer.lr': 3e-3}.items():
    config.override(cfg, key, str(value))

  def batch(step, sharding):
    rng = np.random.default_rng(step)
    order = rng.integers(0, 2, B)
    low, high = rng.integers(0, 100, (B, 15)), rng.integers(100, 200, (B, 14))
    first = np.where(order[:, None] == 1, high[:, :14], low[:, :14])
    second = np.where(order[:, None] == 1, low[:, :14], high[:, :14])
    ids = np.concatenate([np.full((B, 1), 257), first, np.full((B, 1), 258), second,
                          np.full((B, 1), 258), np.full((B, 1), 260)], axis=1).astype(np.int32)
    batch = {'ids': ids, 'types': (np.arange(32) >= 16).astype(np.int32)[None].repeat(B, 0),
             'pad': (np.arange(32) < 31)[None].repeat(B, 0), 'labels': ids,
             'mlm_mask': np.zeros((B, 32), np.float32), 'order': order.astype(np.int32)}
    return jax.device_put(batch, sharding)
  acc = run_steps(cfg, jax.devices()[:1], 40, batch)[2]['sop_acc']
  assert np.mean(acc[:5]) < 0.8 and np.mean(acc[-10:]) > 0.95, acc
