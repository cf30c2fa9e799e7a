"""Every named GPT config builds abstractly at its published size; 8.3B compiles for 8-way tensor parallel."""
import jax
import jax.numpy as jnp
import pytest

from shardlm import config, train

# name: (layers L, hidden D, padded vocabulary V for the config's own mesh.model, Megatron-LM
# Table 2 parameter count). gpt_345m is Megatron-LM's checkpoint name; its table says 355M.
NAMED = {
    'tiny': (4, 128, 384, None),
    'gpt_345m': (24, 1024, 50304, 355e6),
    'gpt_1_2b': (40, 1536, 50304, 1.2e9),
    'gpt_2_5b': (54, 1920, 50432, 2.5e9),
    'gpt_4_2b': (64, 2304, 50688, 4.2e9),
    'gpt_8b': (72, 3072, 51200, 8.3e9),
}


def gpt2_param_count(L, D, V, T):
  """GPT-2 / Megatron: per layer Q/K/V and output (4D^2 + 4D), MLP (8D^2 + 5D), two LayerNorms
  (4D); then token table V x D, position table T x D, final LayerNorm 2D."""
  return L * (12 * D * D + 13 * D) + V * D + T * D + 2 * D


def setup_for(name, **overrides):
  cfg = config.load(name)
  for key, value in overrides.items():
    config.override(cfg, key, str(value))
  # One model copy: exactly mesh.model devices, so padding follows the config's own layout.
  return train.setup(cfg, jax.devices()[:cfg.mesh.model])


def count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('name', NAMED)
def test_parameter_count(name):
  L, D, V, paper = NAMED[name]
  s = setup_for(name)
  assert s.rt.model_config.padded_vocab == V
  state = jax.eval_shape(s.init)  # the real initializer, abstractly: no memory
  n = count(state['params'])
  assert n == gpt2_param_count(L, D, V, s.rt.cfg.model.seq_len)
  if paper:
    assert abs(n / paper - 1) < 0.02, f'{name}: {n:,} parameters, the paper says {paper:,.0f}'
  # Adam keeps two float32 moments per parameter, laid out like the parameters.
  assert 0 <= count(state['opt_state']) - 2 * n < 8  # the rest: int32 step counters
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state['params']))


def test_8b_compiles_for_8_way_tensor_parallel():
  B = 8  # a small global batch keeps the compile short; parameter memory does not depend on it
  s = setup_for('gpt_8b', **{'data.batch_size': B})
  assert dict(s.rt.mesh.shape) == {'data': 1, 'stage': 1, 'fsdp': 1, 'context': 1, 'model': 8}
  T = s.rt.cfg.model.seq_len
  abstract = jax.eval_shape(s.init)
  compiled = s.step.lower(abstract, jax.ShapeDtypeStruct((B, T + 1), jnp.int32)).compile()
  mem = compiled.memory_analysis()

  # Per device under megatron_fsdp with fsdp=1: Q/K/V and output kernels split 8 ways on heads,
  # the Q/K/V bias on heads, both MLP kernels and the first bias on F, the token table on V;
  # the six vectors over D per layer (two LayerNorms, two output biases), ln_f and the
  # position table are whole on every device.
  L, D, V = 72, 3072, 51200
  F = 4 * D
  split = L * (4 * D * D + 3 * D + 2 * D * F + F) + V * D
  whole = L * 6 * D + 2 * D + T * D
  params_per_device = split // 8 + whole
  state_bytes = 3 * 4 * params_per_device  # float32 parameters, Adam mu and nu
  tokens_bytes = B * (T + 1) * 4  # int32, replicated: data x fsdp = 1
  # 1 KiB of slack covers the optimizer's int32 counters and nothing else: the smallest layout
  # slip (ln_f split 8 ways) would move 63 KiB, a replicated Q/K/V bias 7 MB.
  assert abs(mem.argument_size_in_bytes - (state_bytes + tokens_bytes)) < 1024
  assert 12.4e9 < state_bytes < 12.6e9  # about 8.3e9 x 12 bytes / 8
  # The state is donated: the new state is written over the old, not into a second 12.5 GB.
  assert mem.alias_size_in_bytes >= state_bytes


def test_gpt_1t_is_narayanan_et_al_s_trillion():
  # Narayanan et al. 2021, Table 1: 128 layers x 25600 x 160 heads, T=2048, 1008B parameters at
  # vocabulary 51200 (GPT-2's 50257 padded for mesh.model=8). One pipeline stage here: the
  # count does not depend on the layout.
  cfg = config.load('gpt_1t')
  config.override(cfg, 'mesh.stage', '1')
  config.override(cfg, 'mesh.data', '1')
  s = train.setup(cfg, jax.devices()[:8])
  L, D, T = 128, 25600, 2048
  assert s.rt.model_config.padded_vocab == 51200
  n = count(s.rt.abstract_params)
  assert n == gpt2_param_count(L, D, 51200, T)
  assert abs(n / 1008e9 - 1) < 0.02, n
  assert s.rt.model_config.num_heads == 160
