"""BERT: the same blocks, bidirectional; sharded runs equal the single-device run."""
import jax
import numpy as np
import pytest
from conftest import run_steps

from shardlm import config, runtime, train

B, T = 16, 32


def synthetic_batch(step, vocab=257):
  """A BERT batch with padding, masked positions and order labels; fixed by the step."""
  rng = np.random.default_rng(step)
  lengths = rng.integers(T // 2, T + 1, B)
  pad = np.arange(T)[None] < lengths[:, None]
  mlm_mask = pad & (rng.random((B, T)) < 0.15)
  return {'ids': rng.integers(0, vocab, (B, T)).astype(np.int32),
          'types': (np.arange(T)[None] >= lengths[:, None] // 2).astype(np.int32),
          'pad': pad, 'labels': rng.integers(0, vocab, (B, T)).astype(np.int32),
          'mlm_mask': mlm_mask.astype(np.float32), 'order': rng.integers(0, 2, B).astype(np.int32)}


def losses(cfg, devices, steps=3):
  put = lambda step, sharding: jax.device_put(synthetic_batch(step), sharding)
  m = run_steps(cfg, devices, steps, put)[2]
  return np.stack([m['loss'], m['mlm_loss'], m['sop_loss']], axis=1)


def bert_cfg(**mesh):
  cfg = config.load('tiny')
  for key, value in dict(model__kind='bert', model__num_layers=2, model__seq_len=T,
                         data__batch_size=B, **{f'mesh__{k}': v for k, v in mesh.items()}).items():
    config.override(cfg, key.replace('__', '.'), str(value))
  return cfg


@pytest.fixture(scope='module')
def reference():
  return losses(bert_cfg(data=1), jax.devices()[:1])


@pytest.mark.parametrize('preset, mesh', [
    ('dp', dict(data=8)),
    ('megatron', dict(data=2, model=4)),
    ('fsdp', dict(data=1, fsdp=8)),
])
def test_bert_layouts_match_single_device(preset, mesh, reference):
  cfg = bert_cfg(**mesh)
  config.override(cfg, 'sharding.preset', preset)
  np.testing.assert_allclose(losses(cfg, jax.devices()), reference, rtol=1e-5)


def test_padding_is_invisible(tiny):
  """Changing the tokens behind the padding changes nothing; changing a real token does."""
  rt = runtime.build(bert_cfg(data=1), jax.devices()[:1])
  params = rt.init_params(0)
  b = synthetic_batch(0)
  out = rt.apply(params, b['ids'], b['types'], b['pad'])
  ids = np.where(b['pad'], b['ids'], (b['ids'] + 7) % 257)
  out2 = rt.apply(params, ids, b['types'], b['pad'])
  real = b['pad']
  np.testing.assert_allclose(out2[0][real], out[0][real], atol=1e-5)
  np.testing.assert_allclose(out2[1], out[1], atol=1e-5)
  ids[0, 0] = (ids[0, 0] + 1) % 257
  assert not np.allclose(rt.apply(params, ids, b['types'], b['pad'])[1][0], out[1][0], atol=1e-6)


def bert_param_count(L, D, Vp, T):
  """The blocks as GPT's; token (V padded), position and 2 token-type tables; the final (pre-LN)
  LayerNorm; the MLM head's dense D x D, LayerNorm and per-token bias (padded); pooler; SOP."""
  return (L * (12 * D * D + 13 * D) + Vp * D + T * D + 2 * D + 2 * D
          + (D * D + D) + 2 * D + Vp + (D * D + D) + (2 * D + 2))


@pytest.mark.parametrize('name, L, D, Vp, paper', [
    ('bert_tiny', 4, 128, 384, None),
    ('bert_336m', 24, 1024, 30592, 336e6),
    ('bert_1_3b', 24, 2048, 30720, 1.3e9),
    ('bert_3_9b', 48, 2560, 30720, 3.9e9),
])
def test_named_bert_configs(name, L, D, Vp, paper):
  """Megatron-LM Table 4 sizes, built abstractly on the config's own model-parallel size."""
  cfg = config.load(name)
  s = train.setup(cfg, jax.devices()[:cfg.mesh.model])
  assert s.rt.model_config.padded_vocab == Vp and not s.rt.model_config.causal
  n = sum(x.size for x in jax.tree.leaves(jax.eval_shape(s.init)['params']))
  assert n == bert_param_count(L, D, Vp, cfg.model.seq_len)
  if paper:
    assert abs(n / paper - 1) < 0.03, f'{name}: {n:,} parameters, the paper says {paper:,.0f}'


@pytest.mark.slow
def test_bert_tiny_trains(default_run):
  """The bert_tiny config on the default corpus: the masked-LM loss falls well below its start,
  and the sentence-order loss is part of the validation loss (its accuracy stays near chance at
  this size and length: see the config's docstring)."""
  import json
  proc, run_dir, _ = default_run(config='bert_tiny')
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  val = [r for r in records if 'val_loss' in r]
  assert val[0]['val_mlm_loss'] > 5.0  # ln 261 at initialisation
  assert val[-1]['val_mlm_loss'] < 0.6 * val[0]['val_mlm_loss']
  assert val[-1]['val_loss'] == pytest.approx(val[-1]['val_mlm_loss'] + val[-1]['val_sop_loss'], 1e-5)
  assert 'mlm_loss' in proc.stdout and 'sop_acc' in proc.stdout


@pytest.mark.parametrize('key, value, message', [
    ('model.attention', 'local', 'attends both ways'),
    ('model.mlp_dim', '-4', 'mlp_dim=-4 must be >= 0'),
    ('data.mlm_prob', '1.5', 'mlm_prob=1.5 must be between 0 and 1'),
])
def test_bad_bert_settings(key, value, message):
  from shardlm.errors import ConfigError
  cfg = bert_cfg(data=1)
  config.override(cfg, key, value)
  with pytest.raises(ConfigError, match=message):
    train.setup(cfg, jax.devices()[:1])
