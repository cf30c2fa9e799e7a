"""The device mesh from the config's `mesh` section, rule presets, logical names -> shardings."""
import difflib
import math

import flax.linen as nn
import jax
from jax.sharding import AxisType

from shardlm import config as config_lib
from shardlm.errors import ConfigError
from shardlm.model import axes

# Mesh axes from the slowest links to the fastest (DESIGN.md, "Mesh and rule table"): the
# innermost axis gets the devices closest together. An axis a config adds that is not listed
# here goes first, where the data-centre network is.
AXIS_ORDER = ('data', 'stage', 'fsdp', 'context', 'model')

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


def mesh_axes(cfg) -> tuple[str, ...]:
  """The config's mesh axes, in DESIGN.md's order (added axes first)."""
  names = list(cfg.mesh.keys())
  return tuple(sorted(names, key=lambda n: (n in AXIS_ORDER, AXIS_ORDER.index(n) if n in AXIS_ORDER
                                            else 0, n)))


def mesh_shape(cfg, num_devices: int) -> dict[str, int]:
  """{axis: size} in mesh order, a single -1 filled in; the sizes multiply to num_devices."""
  names = mesh_axes(cfg)
  sizes = [cfg.mesh[n] for n in names]
  for n, s in zip(names, sizes):
    if isinstance(s, bool) or not isinstance(s, int) or s == 0 or s < -1:
      raise ConfigError(f'mesh.{n}={s!r}: a mesh axis size is a positive integer or -1')
  given = dict(zip(names, sizes))
  if sizes.count(-1) > 1:
    raise ConfigError(f'mesh {given}: at most one axis may be -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'mesh {given}: the fixed axes ({known}) do not divide the {num_devices} '
                        'devices')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    product = ' x '.join(f'{n}={s}' for n, s in zip(names, sizes))
    raise ConfigError(f'mesh {product} = {math.prod(sizes)} devices, but {num_devices} are '
                      'available; make the product equal the device count or set one axis to -1')
  return dict(zip(names, sizes))


def rules_from_config(cfg) -> tuple:
  """The rule table: the user's `sharding.rules` first (they win), then the preset's.

  Every logical name must be in the alphabet and every mesh axis in the `mesh` section; an axis
  the config adds (not in the defaults) must be used by some rule, so that a misspelt axis is an
  error rather than a silently replicated copy of the model.
  """
  preset = cfg.sharding.preset
  if preset not in PRESETS:
    raise ConfigError(f"sharding.preset='{preset}' is not one of {', '.join(PRESETS)}")
  names = mesh_axes(cfg)
  rules = []
  for rule in tuple(cfg.sharding.rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ConfigError(f'sharding.rules entry {rule!r} is not a (logical name, mesh axes) pair')
    name, to = rule
    if name not in axes.LOGICAL_NAMES:
      hint = difflib.get_close_matches(str(name), axes.LOGICAL_NAMES, n=2)
      raise ConfigError(f"sharding.rules names unknown logical axis '{name}'"
                        + (f" (did you mean {' or '.join(hint)}?)" if hint else '')
                        + f"; valid: {', '.join(axes.LOGICAL_NAMES)}")
    flat = (to,) if isinstance(to, str) or to is None else to
    if not isinstance(flat, (tuple, list)):
      raise ConfigError(f"sharding.rules maps '{name}' to {to!r}; expected a mesh axis name, "
                        f"a tuple of them, or None (mesh axes: {', '.join(names)})")
    for a in flat:
      if a is not None and a not in names:
        raise ConfigError(f"sharding.rules maps '{name}' to unknown mesh axis '{a}'; "
                          f"valid: {', '.join(names)} or None")
    rules.append((name, to if isinstance(to, str) or to is None else tuple(to)))
  rules = tuple(rules) + tuple(PRESETS[preset])
  used = {a for _, to in rules for a in ((to,) if isinstance(to, str) else to or ())}
  standard = set(config_lib.defaults().mesh.keys())
  for name in names:
    if name not in standard and name not in used:
      hint = difflib.get_close_matches(name, sorted(standard), n=1)
      raise ConfigError(f"mesh.{name} is not a standard mesh axis ({', '.join(sorted(standard))}) "
                        'and no sharding rule maps anything onto it'
                        + (f'; did you mean mesh.{hint[0]}?' if hint else
                           "; add a rule to sharding.rules, e.g. (('batch', ('"
                           f"{name}', 'data', 'fsdp')),)"))
  return rules


def check_divisible(abstract_tree, shardings, what: str) -> None:
  """Every sharded dimension must split evenly over its mesh axes; say which does not."""
  for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(abstract_tree),
                              jax.tree.leaves(shardings)):
    for dim, to in zip(leaf.shape, sh.spec):
      names = (to,) if isinstance(to, str) else tuple(to or ())
      size = math.prod(sh.mesh.shape[a] for a in names)
      if dim % size:
        raise ConfigError(f'{what} {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be '
                          f'split {size} ways over mesh axes {names}: {dim} is not divisible by '
                          f'{size}; change the model size, the mesh, or sharding.rules')


def make_mesh(shape: dict[str, int], devices=None) -> jax.sharding.Mesh:
  """A mesh of these {axis: size} with Auto axes, so GSPMD propagation is on."""
  return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def logical_to_sharding(tree, mesh, rules):
  """A tree of logical PartitionSpecs -> a tree of NamedShardings; every name checked."""
  for spec in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
    axes.check_names(tuple(spec), 'parameter axes')
  return nn.logical_to_mesh_sharding(tree, mesh, rules)


def named(mesh, rules, names):
  """One NamedSharding for an array whose axes carry these logical names."""
  return axes.named_sharding(mesh, rules, names)


def describe(mesh, rules) -> str:
  """One line for the log: the mesh and the rules that shard something."""
  shape = ' x '.join(f'{n}={s}' for n, s in mesh.shape.items())
  used = ', '.join(f'{n}->{a}' for n, a in rules if a is not None)
  return f'mesh {shape}; rules {used}'
