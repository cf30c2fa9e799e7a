"""Gradient accumulation: the batch cut into micro-batches, gradients summed by a lax.scan."""
import jax
import jax.numpy as jnp


def split(batch, k: int, constrain=None):
  """A batch tree [B, ...] -> [k, B/k, ...]: micro-batch i takes rows i, i+k, i+2k, ...

  Strided rather than contiguous rows, so that each device keeps an equal share of every
  micro-batch (the batch is sharded by rows). `constrain(tree)` may pin the new layout.
  """
  micro = jax.tree.map(lambda x: x.reshape(-1, k, *x.shape[1:]).swapaxes(0, 1), batch)
  return constrain(micro) if constrain else micro


def value_and_grad(fn, params, batch, k: int, constrain=None):
  """Mean of `fn(params, micro) -> (value, grads)` over k micro-batches of `batch`.

  `value` may be any tree (the loss and its metrics). k = 1 calls fn once on the whole batch.
  Memory holds one micro-batch's activations and one running sum of the gradients.
  """
  if k == 1:
    return fn(params, batch)
  micro = split(batch, k, constrain)

  def body(acc, b):
    return jax.tree.map(jnp.add, acc, fn(params, b)), None
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), jax.eval_shape(fn, params, first))
  total, _ = jax.lax.scan(body, zeros, micro)
  return jax.tree.map(lambda x: x / k, total)
