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


def value_and_grad(fn, params, batch, k: int, constrain=None, indexed=False):
  """Mean of `fn(params, micro) -> (value, grads)` over k micro-batches of `batch`; with
  `indexed`, `fn(params, micro, i)` also gets the micro-batch's index (0 when k = 1).

  `value` may be any tree (the loss and its metrics). k = 1 calls fn once on the whole batch.
  Memory holds one micro-batch's activations and one running sum of the gradients.
  """
  call = fn if indexed else lambda p, b, i: fn(p, b)
  if k == 1:
    return call(params, batch, 0)
  micro = split(batch, k, constrain)

  def body(acc, xs):
    return jax.tree.map(jnp.add, acc, call(params, *xs)), None
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), jax.eval_shape(call, params, first, 0))
  total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(k)))
  return jax.tree.map(lambda x: x / k, total)
