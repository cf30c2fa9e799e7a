"""Device mesh, logical-axis rule tables (presets), and logical names -> shardings."""
import contextlib
import contextvars

import flax.linen as nn
import jax
from jax.sharding import AxisType, NamedSharding

from shardlm.config import ConfigError

MESH_AXES = ('data', 'fsdp', 'model')
# Every logical name the model uses (DESIGN.md, "The dimension alphabet").
LOGICAL_NAMES = ('batch', 'length', 'embed', 'act_embed', 'mlp', 'act_mlp', 'heads', 'act_heads',
                 'kv', 'vocab', 'act_vocab', 'layers')

_BATCH = [('batch', ('data', 'fsdp'))]
_TENSOR = [('vocab', 'model'), ('act_vocab', 'model'), ('mlp', 'model'), ('act_mlp', 'model'),
           ('heads', 'model'), ('act_heads', 'model')]
_FSDP = [('embed', 'fsdp')]
# Ordered (logical name, mesh axes) pairs; names not listed are replicated.
PRESETS = {
    'dp': _BATCH,
    'megatron': _BATCH + _TENSOR,
    'fsdp': _BATCH + _FSDP,
    'megatron_fsdp': _BATCH + _TENSOR + _FSDP,
}

_active = contextvars.ContextVar('shardlm_sharding', default=None)


def rules_from_config(cfg) -> tuple:
  """The rule table: the user's `sharding.rules` first (they win), then the preset's."""
  preset = cfg.sharding.preset
  if preset not in PRESETS:
    raise ConfigError(f"sharding.preset='{preset}' is not one of {', '.join(PRESETS)}")
  rules = []
  for rule in tuple(cfg.sharding.rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ConfigError(f'sharding.rules entry {rule!r} is not a (logical name, mesh axes) pair')
    name, axes = rule
    if name not in LOGICAL_NAMES:
      raise ConfigError(f"sharding.rules names unknown logical axis '{name}'; "
                        f"valid: {', '.join(LOGICAL_NAMES)}")
    flat = (axes,) if isinstance(axes, str) or axes is None else axes
    if not isinstance(flat, (tuple, list)):
      raise ConfigError(f"sharding.rules maps '{name}' to {axes!r}; expected a mesh axis name, "
                        f"a tuple of them, or None (mesh axes: {', '.join(MESH_AXES)})")
    for a in flat:
      if a is not None and a not in MESH_AXES:
        raise ConfigError(f"sharding.rules maps '{name}' to unknown mesh axis '{a}'; "
                          f"valid: {', '.join(MESH_AXES)} or None")
    rules.append((name, axes if isinstance(axes, str) or axes is None else tuple(axes)))
  return tuple(rules) + tuple(PRESETS[preset])


def check_divisible(abstract_tree, shardings, what: str) -> None:
  """Every sharded dimension must split evenly over its mesh axes; say which does not."""
  for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(abstract_tree),
                              jax.tree.leaves(shardings)):
    for dim, axes in zip(leaf.shape, sh.spec):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      size = 1
      for a in names:
        size *= sh.mesh.shape[a]
      if dim % size:
        raise ConfigError(f'{what} {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be '
                          f'split {size} ways over mesh axes {names}: {dim} is not divisible by '
                          f'{size}; change the model size, the mesh, or sharding.rules')


def make_mesh(shape: tuple[int, int, int], devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, model) mesh with Auto axes, so GSPMD propagation is on."""
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_sharding(tree, mesh, rules):
  """A tree of logical PartitionSpecs -> a tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(tree, mesh, rules)


def named(mesh, rules, names) -> NamedSharding:
  """One NamedSharding for an array whose axes carry these logical names."""
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
  active = _active.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, named(mesh, rules, names))


def describe(mesh, rules) -> str:
  """One line for the log: the mesh and the rules that shard something."""
  shape = ' x '.join(f'{n}={s}' for n, s in mesh.shape.items())
  used = ', '.join(f'{n}->{a}' for n, a in rules if a is not None)
  return f'mesh {shape}; rules {used}'
