"""Evaluation and generation on a small random GPT: the bookkeeping against direct computation."""
import math

import jax
import numpy as np
import pytest
from conftest import params_checkpoint

from shardlm import config, evaluate, generate, inference, runtime
from shardlm.data.tokenizer import ByteTokenizer

TEXT = (b'import os\n\ndef walk(path):\n    for root, dirs, files in os.walk(path):\n'
        b'        yield from files\n' * 3)


def loaded(devices, **overrides):
  cfg = config.load('tiny')
  for key, value in dict(model__num_layers=2, model__seq_len=32, **overrides).items():
    config.override(cfg, key.replace('__', '.'), str(value))
  rt = runtime.build(cfg, devices)
  return inference.Loaded(cfg, rt, rt.init_params(cfg.train.seed), ByteTokenizer(), None)


def generator(loaded):
  return generate.Generator(loaded.rt, loaded.params, loaded.tokenizer.eod_id)


@pytest.fixture(scope='module')
def model():
  return loaded(jax.devices()[:1], mesh__data=1)


def test_windows_score_every_target_once():
  for n, T, stride in [(100, 32, 32), (100, 32, 8), (33, 32, 16), (5, 32, 16), (97, 10, 3)]:
    scored = []
    for start, first in evaluate.windows(n, T, stride):
      scored += [t for t in range(start + 1, start + T + 1) if t >= first and t < n]
    assert scored == list(range(1, n)), (n, T, stride)


def test_perplexity_with_stride_equal_to_window_is_exp_mean_loss(model):
  tokens = ByteTokenizer().encode(TEXT)
  T = model.cfg.model.seq_len
  r = evaluate.perplexity(model.score, tokens, T, T, 4, len(TEXT), len(TEXT.split()))
  # Direct: chunks of T+1 tokens overlapping by one, the training loss of each.
  nll = []
  for start in range(0, len(tokens) - 1, T):
    piece = tokens[start:start + T + 1]
    row = np.zeros((1, T + 1), np.int32)
    row[0, :len(piece)] = piece
    nll += list(model.score(row)[0][0, :len(piece) - 1])
  assert r['tokens_scored'] == len(tokens) - 1 == len(nll)
  np.testing.assert_allclose(r['token_ppl'], math.exp(np.mean(nll)), rtol=1e-5)
  np.testing.assert_allclose(r['bits_per_byte'], np.sum(nll) / math.log(2) / len(TEXT), rtol=1e-5)


def test_overlapping_windows_match_brute_force(model):
  tokens = ByteTokenizer().encode(TEXT[:120])
  T, stride = model.cfg.model.seq_len, 8
  r = evaluate.perplexity(model.score, tokens, T, stride, 3, 120, 10)
  # Brute force: each target scored alone, with the context its window gives it.
  total = 0.0
  for start, first in evaluate.windows(len(tokens), T, stride):
    for t in range(max(first, start + 1), min(start + T + 1, len(tokens))):
      row = np.zeros((1, T + 1), np.int32)
      ctx = tokens[start:t + 1]
      row[0, :len(ctx)] = ctx
      total += float(model.score(row)[0][0, len(ctx) - 2])
  np.testing.assert_allclose(r['loss'], total / (len(tokens) - 1), rtol=1e-5)


def test_lambada_counts_a_hit_only_when_every_token_is_right():
  """A stand-in model that predicts every byte right except 'X': the last word decides."""
  def score(rows):
    return np.zeros(rows[:, 1:].shape), rows[:, 1:] != ord('X')
  examples = ['the cat sat on the mat', 'the cat sat on the mXt', 'Xhe cat sat on the mat',
              'a b c d e f g h i j k l m n o p q r s t u v w x y z word']  # context cut to fit
  r = evaluate.lambada(score, examples, ByteTokenizer(), 16, 3)
  assert r == {'examples': 4, 'accuracy': 0.75}


@pytest.mark.parametrize('mesh, n, scan', [(dict(data=1), 1, False), (dict(data=1, model=4), 4, False),
                                           (dict(data=1, model=4), 4, True)])
def test_greedy_with_cache_equals_recomputing(mesh, n, scan):
  """On one device and split over heads; the layers unrolled (tiny) and scanned (large)."""
  m = loaded(jax.devices()[:n], model__scan_layers=scan, **{f'mesh__{k}': v for k, v in mesh.items()})
  prompts = [np.frombuffer(b'def f(x):\n    ret', np.uint8).astype(np.int32),
             np.frombuffer(b'import sys\nimport', np.uint8).astype(np.int32)]
  gen = generator(m)
  with_cache = gen(prompts, 12, use_cache=True)
  without = gen(prompts, 12, use_cache=False)
  for a, b in zip(with_cache, without):
    np.testing.assert_array_equal(a, b)


def test_sampling_is_reproducible_and_never_picks_padding(model):
  gen = generator(model)
  prompt = [np.frombuffer(b'for i in', np.uint8).astype(np.int32)]
  a = gen(prompt, 16, temperature=1.5, top_k=50, seed=3)[0]
  b = gen(prompt, 16, temperature=1.5, top_k=50, seed=3)[0]
  c = gen(prompt, 16, temperature=1.5, top_k=50, seed=4)[0]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  d = gen(prompt, 24, temperature=5.0, top_p=0.99, seed=1)[0]  # near-uniform sampling
  assert d.max() < model.rt.model_config.vocab_size  # 257 real ids of 384 padded


def test_a_checkpoint_loads_when_where_its_run_started_is_gone(tmp_path):
  """Evaluation and generation ignore the training run's resume / init_from paths."""
  cfg = config.load('tiny')
  for key, value in dict(model__num_layers=1, model__seq_len=32, train__init_from='/gone/params',
                         train__resume='/gone/run', checkpoint__dir='/gone/ckpts').items():
    config.override(cfg, key.replace('__', '.'), str(value))
  # The runtime (no training) does not look at those paths either.
  out = params_checkpoint(tmp_path / 'params', runtime.build(cfg, jax.devices()[:1]))
  m = inference.load(out, devices=jax.devices()[:1])
  nll, _ = m.score(np.zeros((1, 33), np.int32))
  assert nll.shape == (1, 32) and np.isfinite(nll).all()


def test_a_left_padded_prompt_decodes_as_it_does_alone(model):
  """In a batch, shorter prompts are left-padded: positions and the cache mask make that
  invisible, so a prompt decodes the same with a longer neighbour as on its own."""
  gen = generator(model)
  short = np.frombuffer(b'x = f(', np.uint8).astype(np.int32)
  long = np.frombuffer(b'import sys\nimport os\n', np.uint8).astype(np.int32)
  together = gen([short, long], 10)
  alone = gen([short], 10)
  np.testing.assert_array_equal(together[0], alone[0])
