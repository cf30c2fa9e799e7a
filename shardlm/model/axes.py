"""The logical axis alphabet and `constrain`: the only part of shardlm that model code imports.

Model code names axes with these logical names only; the rule table (shardlm.sharding) maps them
onto mesh axes. A name outside the alphabet is an error when the model is traced, never a silent
"replicated".
"""
import contextlib
import contextvars

import flax.linen as nn
import jax
from jax.sharding import NamedSharding

# DESIGN.md, "The dimension alphabet": parameter names, then activation names.
PARAM_NAMES = ('embed', 'mlp', 'heads', 'kv', 'vocab', 'layers', 'stage')
ACTIVATION_NAMES = ('batch', 'length', 'act_length', 'act_embed', 'act_mlp', 'act_heads',
                    'act_vocab', 'act_stage')
LOGICAL_NAMES = PARAM_NAMES + ACTIVATION_NAMES

_active = contextvars.ContextVar('shardlm_rules', default=None)


def check_names(names, where: str = 'logical axes') -> None:
  """Raises ValueError if any name (None aside) is outside the alphabet."""
  for name in names:
    if name is not None and name not in LOGICAL_NAMES:
      raise ValueError(f"{where} {tuple(names)} name unknown logical axis '{name}'; "
                       f"the alphabet (DESIGN.md): {', '.join(LOGICAL_NAMES)}")


def named_sharding(mesh, rules, names) -> NamedSharding:
  """The NamedSharding for an array whose axes carry these logical names."""
  check_names(names)
  return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))


@contextlib.contextmanager
def use(mesh, rules):
  """Makes `constrain` active while tracing: model code then pins activation layouts."""
  token = _active.set((mesh, rules))
  try:
    yield
  finally:
    _active.reset(token)


def constrain(x, names):
  """Pins an activation to the layout its logical names map to; a no-op outside `use`."""
  check_names(names)
  active = _active.get()
  if active is None:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(*active, names))
