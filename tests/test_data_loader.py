"""The loader: packed samples, per-epoch permutations, step-indexed batches, blending, splits, the cache."""
import collections
import concurrent.futures
import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from shardlm import config
from shardlm.data import indexed, loader, preprocess, sources, tokenizer

T, B = 16, 8


def stream(n: int, offset: int = 0) -> np.ndarray:
  return (np.arange(n) + offset).astype(np.uint32)  # token value = its position: easy to check


def test_samples_are_packed_windows_of_t_plus_one():
  tokens = stream(10 * T + 5)
  b = loader.Batches(tokens, T, B, seed=0)
  assert b.num_samples == [10]
  for j in range(10):
    k, i = b.locate(j)
    np.testing.assert_array_equal(b.sample(j), tokens[i * T:i * T + T + 1])
  rows = b.rows(0, 0, B)
  assert rows.dtype == np.int32 and rows.shape == (B, T + 1)
  assert all(r[0] % T == 0 and np.all(np.diff(r) == 1) for r in rows)


def test_each_epoch_is_a_permutation_and_the_order_depends_only_on_the_seed():
  n = 50
  b = loader.Batches(stream(n * T + 1), T, B, seed=3)
  epochs = [[b.locate(e * n + j)[1] for j in range(n)] for e in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(n))  # every sample exactly once per epoch
  assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(n))
  again = loader.Batches(stream(n * T + 1), T, B, seed=3)
  assert [again.locate(j)[1] for j in range(n)] == epochs[0]
  other = loader.Batches(stream(n * T + 1), T, B, seed=4)
  assert [other.locate(j)[1] for j in range(n)] != epochs[0]


@pytest.mark.parametrize('prefetch', [0, 2])
def test_batch_of_a_step_is_the_same_after_a_restart_and_in_any_order(prefetch):
  tokens = stream(40 * T + 1)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P('data', None))
  first = loader.Batches(tokens, T, B, seed=0, prefetch=prefetch)
  run = {s: np.asarray(first.global_batch(s, sharding)) for s in range(12)}
  restarted = loader.Batches(tokens, T, B, seed=0, prefetch=prefetch)
  for s in (7, 8, 9, 3, 11):  # a restart at step 7, then steps out of order
    np.testing.assert_array_equal(np.asarray(restarted.global_batch(s, sharding)), run[s])
  for s in range(12):
    np.testing.assert_array_equal(run[s], first.rows(s, 0, B))
  assert not np.array_equal(run[0], run[1])


def test_blend_shares_match_the_weights_and_are_the_same_every_run():
  a, b = stream(3000 * T + 1), stream(500 * T + 1, offset=10 ** 6)
  mixes = [loader.Batches([a, b], T, B, seed=1, weights=(0.7, 0.3)) for _ in range(2)]
  picks = [[m.locate(j) for j in range(10_000)] for m in mixes]
  assert picks[0] == picks[1]
  share = collections.Counter(k for k, _ in picks[0])
  assert abs(share[0] / 10_000 - 0.7) < 0.01 and abs(share[1] / 10_000 - 0.3) < 0.01
  # A pure function of the index: asking in another order gives the same answer.
  fresh = loader.Batches([a, b], T, B, seed=1, weights=(0.7, 0.3))
  assert [fresh.locate(j) for j in range(9_999, -1, -97)] == picks[0][9_999::-97]
  # The small dataset is repeated (3000 draws from 500 samples), each pass a new permutation.
  from_b = [i for k, i in picks[0] if k == 1]
  assert sorted(from_b[:500]) == list(range(500)) and from_b[:500] != from_b[500:1000]
  # Samples come from the right stream: b's tokens start at 10**6.
  rows = mixes[0].rows(0, 0, B)
  for row, (k, _) in zip(rows, picks[0][:B]):
    assert (row[0] >= 10 ** 6) == (k == 1)


def test_default_weights_follow_dataset_sizes():
  m = loader.Batches([stream(300 * T + 1), stream(100 * T + 1)], T, B, seed=0)
  share = collections.Counter(m.locate(j)[0] for j in range(4000))
  assert abs(share[0] / 4000 - 0.75) < 0.01


def test_megatron_split_by_documents():
  assert loader.split_fractions('969,30,1') == pytest.approx((0.969, 0.03, 0.001))
  assert loader.split_fractions('9,1') == pytest.approx((0.9, 0.1, 0.0))
  assert loader.split_ranges(1000, loader.split_fractions('969,30,1')) == [(0, 969), (969, 999), (999, 1000)]
  assert loader.split_ranges(10, loader.split_fractions('80,10,10')) == [(0, 8), (8, 9), (9, 10)]
  for bad in ('', 'a,b', '1,2,3,4', '-1,2', '0,0,0'):
    with pytest.raises(config.ConfigError, match='data.split'):
      loader.split_fractions(bad)


def write_dataset(tmp_path, name, docs, tok_name='byte'):
  path = tmp_path / f'{name}.jsonl'
  path.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
  preprocess.preprocess(sources.Corpus([path]), tmp_path / name, tok_name)
  return str(tmp_path / name)


def data_cfg(**kw):
  data = config.defaults().data
  data.update(**kw)
  return data


def test_from_config_splits_and_blends_indexed_datasets(tmp_path):
  docs_a = [f'a document {i} ' * 5 for i in range(100)]
  docs_b = [f'B DOC {i} ' * 9 for i in range(50)]
  pa, pb = write_dataset(tmp_path, 'a', docs_a), write_dataset(tmp_path, 'b', docs_b)
  tok = tokenizer.ByteTokenizer()
  data = loader.from_config(data_cfg(paths=(pa, pb), weights=(0.5, 0.5), split='80,10,10'), tok, T, B)
  for split, (lo, hi) in zip(('train', 'validation', 'test'), [(0, 80), (80, 90), (90, 100)]):
    batches = getattr(data, split)
    assert tok.decode(batches.streams[0]) == ''.join(docs_a[lo:hi])  # decode drops end-of-document
    assert batches.weights == (0.5, 0.5)
  # The splits share no document: every validation sample lies in a's documents 80-89 or b's 40-44.
  val_a, val_b = ''.join(docs_a[80:90]), ''.join(docs_b[40:45])
  for row in data.validation.rows(0, 0, B):
    assert tok.decode(row) in val_a or tok.decode(row) in val_b
  assert '0.5 x' in data.summary and 'validation' in data.summary


def test_from_config_rejects_mismatches(tmp_path):
  pa = write_dataset(tmp_path, 'a', ['x' * 50] * 20)
  tok = tokenizer.ByteTokenizer()
  cases = [
      (dict(paths=(pa, pa), weights=(1.0,)), 'data.weights has 1'),
      (dict(paths=(pa,), weights=(0.0,)), 'positive'),
      (dict(paths=(str(tmp_path / 'nosuch'),)), 'nosuch.idx not found'),
      (dict(paths=(pa,), split='99,1'), 'validation split of'),  # 20 documents: none left for it
      (dict(corpus='wiki'), "data.corpus='wiki'"),
  ]
  for kw, match in cases:
    with pytest.raises(config.ConfigError, match=match):
      loader.from_config(data_cfg(**kw), tok, T, B)
  bpe = tokenizer.train_bpe(iter(['some text here'] * 10), 300, tmp_path / 'tok.json')
  with pytest.raises(config.ConfigError, match='vocabulary of 257 ids'):
    loader.from_config(data_cfg(paths=(pa,), tokenizer=bpe.name), bpe, T, B)


def test_stdlib_corpus_is_built_once_and_safely_by_two_builders(tmp_path, monkeypatch):
  monkeypatch.setenv('SHARDLM_CACHE', str(tmp_path / 'cache'))
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two builders racing for the cache
    prefixes = list(pool.map(lambda _: preprocess.stdlib_dataset('byte'), range(2)))
  assert prefixes[0] == prefixes[1]
  assert [p.name for p in (tmp_path / 'cache').iterdir()] == [prefixes[0].parent.name]  # no temp left
  ds = indexed.IndexedDataset(prefixes[0])
  texts = []
  for f in preprocess.stdlib_files():  # one document per file; empty and non-UTF-8 files skipped
    try:
      texts += [f.read_bytes().decode('utf-8')] if f.stat().st_size else []
    except UnicodeDecodeError:
      pass
  assert len(ds) == len(texts) > 1000
  tok = tokenizer.ByteTokenizer()
  assert tok.decode(ds[0][:-1]) == texts[0] and tok.decode(ds[-1][:-1]) == texts[-1]
  assert ds.num_tokens == sum(len(t.encode()) + 1 for t in texts)
  mtime = prefixes[0].with_suffix('.bin').stat().st_mtime_ns
  assert preprocess.stdlib_dataset('byte') == prefixes[0]  # reused, not rebuilt
  assert prefixes[0].with_suffix('.bin').stat().st_mtime_ns == mtime
