"""The device mesh from the config's `mesh` section, rule presets, logical names -> shardings."""
import difflib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
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
# Pipeline parallelism, orthogonal to the preset: the layer stack, its stage part and the pipeline
# buffer are split over the `stage` axis. These rules are always there; while mesh.stage is 1 they
# split nothing.
PIPELINE = [('layers', 'stage'), ('stage', 'stage'), ('act_stage', 'stage')]
# Ordered (logical name, mesh axes) pairs; names not listed are replicated.
PRESETS = {
    'dp': _BATCH,
    'megatron': _BATCH + _TENSOR,
    'fsdp': _BATCH + _FSDP,
    'megatron_fsdp': _BATCH + _TENSOR + _FSDP,
    # Korthikanti et al. 2022: the residual stream (LayerNorms, dropout, residual adds) split on T
    # over the tensor-parallel group; each layer's all-reduces become reduce-scatter + all-gather.
    'megatron_sp': _BATCH + _TENSOR + [('act_length', 'model')],
}


def axes_of(to) -> tuple[str, ...]:
  """The mesh axes of a rule's right-hand side: an axis name, a tuple of them, or None."""
  return (to,) if isinstance(to, str) else tuple(to or ())


def mapped_to(rules, name: str) -> tuple[str, ...]:
  """The mesh axes the first rule for logical `name` maps it onto (none: replicated)."""
  return next((axes_of(to) for logical, to in rules if logical == name), ())


def split_ways(shape: dict, rules, name: str) -> int:
  """Into how many shards the rules split an axis with this logical name."""
  return math.prod(shape[a] for a in mapped_to(rules, name))


def split_text(shape: dict, rules, name: str) -> str:
  """'mesh.data=2 x mesh.fsdp=2': what splits `name`, for error messages."""
  return ' x '.join(f'mesh.{a}={shape[a]}' for a in mapped_to(rules, name)) or 'no mesh axis'


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
  if 'context' in names:
    rules = with_context(rules)
  if 'stage' in names:
    rules += tuple(PIPELINE)
  used = {a for _, to in rules for a in axes_of(to)}
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


def with_context(rules) -> tuple:
  """Context parallelism, orthogonal to the preset: every activation's T split over `context`
  (inside any other split of the residual stream, e.g. megatron_sp's), and the parameters split
  over it as FSDP splits them, so that the extra devices do not hold extra copies (as MaxText
  does). Each is composed into the first rule for its name, where that rule stands (the order
  decides which name claims a mesh axis first, e.g. batch before embed), or added when there
  is none: a user rule cannot leave T whole on a context mesh. At mesh.context=1 nothing
  changes."""
  out = list(rules)
  for name, first in (('length', True), ('act_length', True), ('embed', False)):
    i = next((i for i, (n, _) in enumerate(out) if n == name), None)
    if i is None:  # T names go first (nothing else claims `context`), embed after the batch
      out.insert(0, (name, 'context')) if first else out.append((name, 'context'))
      continue
    other = tuple(a for a in axes_of(out[i][1]) if a != 'context')
    out[i] = (name, ('context', *other) if first else (*other, 'context'))
  return tuple(out)


def check_divisible(abstract_tree, shardings, what: str) -> None:
  """Every sharded dimension must split evenly over its mesh axes; say which does not."""
  for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(abstract_tree),
                              jax.tree.leaves(shardings)):
    for dim, to in zip(leaf.shape, sh.spec):
      names = axes_of(to)
      size = math.prod(sh.mesh.shape[a] for a in names)
      if dim % size:
        raise ConfigError(f'{what} {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be '
                          f'split {size} ways over mesh axes {names}: {dim} is not divisible by '
                          f'{size}; change the model size, the mesh, or sharding.rules')


# Axes whose collectives run in every layer (tensor parallelism): across hosts only when the
# config allows it (dist.allow_model_across_hosts).
WITHIN_HOST = ('model',)


def split_over_hosts(shape: dict[str, int], num_hosts: int, allow_model: bool = False) -> dict[str, int]:
  """{axis: how many hosts it spans}: the hosts go to the slowest axes first (added axes, data,
  stage, fsdp, context; model only if allowed), each taking what divides its size."""
  across, left = {name: 1 for name in shape}, num_hosts
  for name in shape:  # mesh order: slowest links first
    if left == 1:
      break
    f = math.gcd(shape[name], left)
    if f > 1 and name in WITHIN_HOST and not allow_model:
      raise ConfigError(f'mesh {_text(shape)} over {num_hosts} hosts would split mesh.{name} across '
                        f'hosts (its collectives run in every layer, over the slow network); give '
                        f'the slower axes (data, fsdp) {num_hosts} hosts between them, or set '
                        'dist.allow_model_across_hosts=true')
    across[name], left = f, left // f
  if left > 1:
    raise ConfigError(f'mesh {_text(shape)} cannot be laid over {num_hosts} hosts: no axis sizes '
                      f'take the remaining factor {left}; make mesh.data a multiple of {num_hosts}')
  return across


def _text(shape: dict) -> str:
  return ' x '.join(f'{n}={s}' for n, s in shape.items())


def make_mesh(shape: dict[str, int], devices=None, host_of=None,
              allow_model_across_hosts: bool = False) -> jax.sharding.Mesh:
  """A mesh of these {axis: size} with Auto axes (GSPMD propagation on).

  Over several hosts (`host_of(process_index)` gives a device's host) it is a hybrid mesh: each
  axis's size is a within-host part times an across-hosts part, and the devices of one host fill
  the within-host parts, as mesh_utils.create_hybrid_device_mesh lays them, so that the fast axes
  stay inside a host.
  """
  devices = list(devices if devices is not None else jax.devices())
  host_of = host_of or (lambda p: p)
  groups = {}
  for d in devices:
    groups.setdefault(host_of(d.process_index), []).append(d)
  names = tuple(shape)
  if len(groups) > 1:
    across = split_over_hosts(shape, len(groups), allow_model_across_hosts)
    within = tuple(shape[n] // across[n] for n in names)
    per_host = [mesh_utils.create_device_mesh(within, sorted(g, key=lambda d: d.id))
                for g in groups.values()]
    grid = _hybrid(per_host, across, within, names)
    return jax.sharding.Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))
  return jax.make_mesh(tuple(shape.values()), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def _hybrid(per_host: list, across: dict, within: tuple, names: tuple) -> np.ndarray:
  """Host meshes [within] arranged on the across-hosts grid: index = host part x within + own."""
  k = len(names)
  stacked = np.stack(per_host).reshape(*(across[n] for n in names), *within)
  # [a_0, ..., a_k-1, w_0, ..., w_k-1] -> [a_0, w_0, a_1, w_1, ...] -> [a_0 w_0, a_1 w_1, ...]
  order = [i for pair in zip(range(k), range(k, 2 * k)) for i in pair]
  return stacked.transpose(order).reshape(*(across[n] * w for n, w in zip(names, within)))


def hosts_spanned(mesh, host_of=None) -> dict[str, int]:
  """{axis: how many hosts one of its groups spans}, for the log."""
  host_of = host_of or (lambda p: p)
  ids = np.vectorize(lambda d: host_of(d.process_index), otypes=[object])(mesh.devices)
  out = {}
  for i, name in enumerate(mesh.axis_names):
    line = np.moveaxis(ids, i, -1).reshape(-1, ids.shape[i])
    out[name] = max(len(set(row)) for row in line)
  return out


def logical_to_sharding(tree, mesh, rules):
  """A tree of logical PartitionSpecs -> a tree of NamedShardings; every name checked."""
  for spec in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
    axes.check_names(tuple(spec), 'parameter axes')
  return nn.logical_to_mesh_sharding(tree, mesh, rules)


def named(mesh, rules, names) -> jax.sharding.NamedSharding:
  """One NamedSharding for an array whose axes carry these logical names (checked)."""
  axes.check_names(names)
  return jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))


class Layout:
  """The mesh and rules behind model/axes.py while a model is traced: pins activations, runs
  shard_map, resolves logical names to mesh axes. Model code sees only logical names."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules

  def spec(self, names) -> jax.sharding.PartitionSpec:
    return named(self.mesh, self.rules, names).spec

  def pin(self, x, names):
    return jax.lax.with_sharding_constraint(x, named(self.mesh, self.rules, names))

  def without(self, taken) -> 'Layout':
    """The layout inside a vmap whose mapped axis holds the mesh axes `taken`."""
    strip = lambda to: tuple(a for a in axes_of(to) if a not in taken) or None
    return Layout(self.mesh, tuple((name, strip(to)) for name, to in self.rules))

  def mesh_axes(self, name: str) -> tuple[tuple[str, ...], int]:
    """(The mesh axes logical `name` maps to, how many devices they span)."""
    to = axes_of(self.spec((name,))[0])
    return to, math.prod(self.mesh.shape[a] for a in to)

  def shard_map(self, f, in_names, out_names):
    specs = lambda tree: jax.tree.map(self.spec, tree, is_leaf=axes.is_names)
    return jax.shard_map(f, mesh=self.mesh, in_specs=specs(tuple(in_names)),
                         out_specs=specs(out_names), check_vma=False)


def describe(mesh, rules, host_of=None) -> str:
  """One line for the log: the mesh, which axes cross hosts, and the rules that shard something."""
  spans = {n: h for n, h in hosts_spanned(mesh, host_of).items() if h > 1}
  across = (f" ({', '.join(f'{n} across {h} hosts' for n, h in spans.items())})" if spans else '')
  sizes = dict(mesh.shape)
  first = [(n, a) for i, (n, a) in enumerate(rules) if n not in {m for m, _ in rules[:i]}]
  used = ', '.join(f'{n}->{a}' for n, a in first  # a later rule for a name is never used
                   if a is not None and math.prod(sizes[x] for x in axes_of(a)) > 1)
  return f'mesh {_text(sizes)}{across}; ' + (f'rules {used}' if used else 'no rule splits anything')
