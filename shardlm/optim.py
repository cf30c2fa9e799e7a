"""The optax chain: clip by global norm, AdamW with Megatron's decay mask, warmup + decay schedule."""
import math

import jax
import jax.numpy as jnp
import optax

from shardlm.errors import ConfigError

# Megatron-LM decays weight matrices and embeddings but not biases or LayerNorm parameters.
_NO_DECAY = ('bias', 'scale')


def schedule(o, total_steps: int) -> optax.Schedule:
  """Linear warmup to lr, then cosine or linear decay to min_lr by decay_steps (or the end)."""
  decay_steps = o.decay_steps or total_steps
  warmup = min(o.warmup_steps, decay_steps)
  if o.schedule == 'constant':
    after = optax.constant_schedule(o.lr)
  elif o.schedule == 'cosine':
    after = optax.cosine_decay_schedule(o.lr, max(decay_steps - warmup, 1), alpha=o.min_lr / o.lr)
  else:
    after = optax.linear_schedule(o.lr, o.min_lr, max(decay_steps - warmup, 1))
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), after], [warmup])


def decay_mask(params):
  """True where weight decay applies: every leaf not named bias or scale."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) not in _NO_DECAY, params)


def make(o, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  lr = schedule(o, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
      optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask),
  )
  return tx, lr


# Dynamic loss scaling for float16 compute, as Megatron-LM's DynamicGradScaler: the loss is
# multiplied by `scale` before differentiation so small gradients survive float16; a step
# whose gradients overflow is skipped, and once `hysteresis` such steps have come since the
# scale last grew, each one halves it; after `loss_scale_window` clean steps in a row it doubles
# (and the hysteresis count starts again).

def loss_scale_init(o) -> dict:
  scale = o.loss_scale or o.initial_loss_scale
  return {'scale': jnp.float32(scale), 'good_steps': jnp.int32(0),
          'hysteresis': jnp.int32(o.hysteresis)}


def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def loss_scale_update(ls: dict, finite, o) -> dict:
  if o.loss_scale:  # a fixed scale never moves
    return ls
  good = jnp.where(finite, ls['good_steps'] + 1, 0)
  grow = good >= o.loss_scale_window
  hysteresis = jnp.where(finite, jnp.where(grow, o.hysteresis, ls['hysteresis']),
                         ls['hysteresis'] - 1)
  shrink = ~finite & (hysteresis <= 0)
  scale = jnp.where(grow, ls['scale'] * 2,
                    jnp.where(shrink, jnp.maximum(ls['scale'] / 2, o.min_loss_scale), ls['scale']))
  return {'scale': scale, 'good_steps': jnp.where(grow, 0, good), 'hysteresis': hysteresis}


def check_config(o) -> None:
  """The `optimizer` section's values, before anything is built."""
  if o.grad_accum_steps < 1:
    raise ConfigError(f'optimizer.grad_accum_steps={o.grad_accum_steps} must be >= 1')
  if o.loss_scale < 0 or o.min_loss_scale <= 0 or o.loss_scale_window < 1 or o.hysteresis < 1:
    raise ConfigError('optimizer.loss_scale >= 0, min_loss_scale > 0, loss_scale_window >= 1 and '
                      'hysteresis >= 1 are required')
  if o.schedule not in ('cosine', 'linear', 'constant'):
    raise ConfigError(f"optimizer.schedule='{o.schedule}' is not one of cosine, linear, constant")
  if not (math.isfinite(o.lr) and math.isfinite(o.min_lr)) or o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
    raise ConfigError(f'optimizer.lr={o.lr}, optimizer.min_lr={o.min_lr}: need 0 <= min_lr <= lr, lr > 0')
  for key in ('b1', 'b2', 'eps', 'weight_decay', 'clip_norm', 'warmup_steps', 'decay_steps'):
    if not math.isfinite(o[key]) or o[key] < 0:
      raise ConfigError(f'optimizer.{key}={o[key]} must be a finite number >= 0')
  if not (o.b1 < 1 and o.b2 < 1):
    raise ConfigError(f'optimizer.b1={o.b1}, optimizer.b2={o.b2}: Adam betas lie in [0, 1)')
