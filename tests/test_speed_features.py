"""Recomputation and local attention: same numbers as the plain computation, less memory or time."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_steps

from shardlm import train
from shardlm.model.attention import local_attention


def small(tiny, **overrides):
  return tiny(**{'model__num_layers': 2, 'model__seq_len': 64, 'data__batch_size': 8, **overrides})


def losses(cfg, steps=3):
  return run_steps(cfg, jax.devices()[:1], steps)[2]['loss']


@pytest.mark.parametrize('T, W', [(64, 16), (100, 16), (48, 64)])
def test_local_attention_equals_banded_dense(T, W):
  q, k, v = (jax.random.normal(key, (2, T, 3, 8)) for key in jax.random.split(jax.random.key(0), 3))
  i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
  band = (j <= i) & (j > i - W)
  dense = lambda q: jax.nn.dot_product_attention(q, k, v, mask=band[None, None])
  local = lambda q: local_attention(q, k, v, W)
  np.testing.assert_allclose(local(q), dense(q), atol=1e-5)
  grad = lambda f: jax.grad(lambda q: jnp.sum(jnp.sin(f(q))))(q)
  np.testing.assert_allclose(grad(local), grad(dense), atol=1e-5)


def test_local_attention_with_a_full_window_is_causal_attention(tiny):
  """A window as long as the sequence sees everything: the model is the dense model."""
  dense = losses(small(tiny))
  np.testing.assert_allclose(losses(small(tiny, model__attention='local', model__window=64)),
                             dense, rtol=1e-6)
  np.testing.assert_allclose(losses(small(tiny, model__attention='alternating', model__window=64)),
                             dense, rtol=1e-6)
  # ...and a short one does not (at initialisation the difference is small, but far above 1e-6).
  assert not np.allclose(losses(small(tiny, model__attention='local', model__window=8)), dense,
                         rtol=1e-5)


@pytest.mark.parametrize('remat', ['selective', 'full'])
def test_remat_gives_the_same_losses(tiny, remat):
  np.testing.assert_allclose(losses(small(tiny, model__remat=remat)), losses(small(tiny)), rtol=1e-6)


def test_remat_lowers_compiled_memory(tiny):
  temp = {}
  for remat in ('none', 'selective', 'full'):
    cfg = tiny(model__num_layers=24, model__hidden=64, model__seq_len=256, data__batch_size=8,
               model__remat=remat, model__scan_layers=True, mesh__data=1)
    s = train.setup(cfg, jax.devices()[:1])
    batch = jax.ShapeDtypeStruct((8, 257), jnp.int32)
    temp[remat] = s.step.lower(jax.eval_shape(s.init), batch).compile().memory_analysis().temp_size_in_bytes
  assert temp['none'] > temp['selective'] > temp['full'], temp
