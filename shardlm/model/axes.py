"""The logical axis alphabet, `constrain`, and a `shard_map`/`vmap` that take logical names: the only
part of shardlm that model code imports.

Model code names axes with these logical names only; the rule table (shardlm.sharding) maps them
onto mesh axes. A name outside the alphabet is an error when the model is traced, never a silent
"replicated". Where a kernel needs explicit collectives (the pipeline's shift, ring attention, the
local-attention halo), it runs them in `shard_map` with logical names, and `pass_on`, `rotate`
and `position` resolve the name to the mesh axes behind it.
"""
import contextlib
import contextvars

import jax
import jax.numpy as jnp

# DESIGN.md, "The dimension alphabet": parameter names, then activation names.
PARAM_NAMES = ('embed', 'mlp', 'heads', 'kv', 'vocab', 'layers', 'stage')
ACTIVATION_NAMES = ('batch', 'length', 'act_length', 'act_embed', 'act_mlp', 'act_heads',
                    'act_vocab', 'act_stage')
LOGICAL_NAMES = PARAM_NAMES + ACTIVATION_NAMES

# The active layout, set by the runtime, which knows the mesh and the rules; model code never
# sees either. It has pin(x, names) -> x constrained to the layout those names map to;
# shard_map(f, in_specs_names, out_specs_names) -> f run per device block; and
# mesh_axes(name) -> (the mesh axes a logical name maps to, their total size).
_active = contextvars.ContextVar('shardlm_layout', default=None)


def check_names(names, where: str = 'logical axes') -> None:
  """Raises ValueError if any name (None aside) is outside the alphabet."""
  for name in names:
    if name is not None and name not in LOGICAL_NAMES:
      raise ValueError(f"{where} {tuple(names)} name unknown logical axis '{name}'; "
                       f"the alphabet (DESIGN.md): {', '.join(LOGICAL_NAMES)}")


@contextlib.contextmanager
def use(layout):
  """Makes `constrain`, `shard_map`, `vmap`, `ways` and the collectives inside `shard_map` follow
  `layout` while tracing."""
  token = _active.set(layout)
  try:
    yield
  finally:
    _active.reset(token)


def bound(f):
  """f, run under the layout active now whenever it is called: for functions JAX traces later,
  such as a custom_vjp's backward rule (traced once the forward pass's `use` has ended)."""
  layout = _active.get()

  def call(*args, **kwargs):
    with use(layout):
      return f(*args, **kwargs)
  return call


def constrain(x, names):
  """Pins an activation to the layout its logical names map to; a no-op outside `use`."""
  check_names(names)
  layout = _active.get()
  return x if layout is None else layout.pin(x, names)


def is_names(x) -> bool:
  return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def shard_map(f, in_names, out_names):
  """f run on each device's block of its arguments. `in_names`: one tuple of logical names per
  positional argument; `out_names`: one for the result (or a tuple of them). Outside `use` (no
  mesh) f sees the whole arrays, as one device holding every block."""
  for names in jax.tree.leaves((in_names, out_names), is_leaf=is_names):
    check_names(names)
  layout = _active.get()
  return f if layout is None else layout.shard_map(f, in_names, out_names)


def ways(name: str) -> int:
  """Into how many blocks the layout splits an axis with logical `name` (1 outside `use`)."""
  check_names((name,))
  layout = _active.get()
  return 1 if layout is None else layout.mesh_axes(name)[1]


def vmap(f, name: str, in_axes=0, out_axes=0):
  """jax.vmap whose mapped axis carries logical `name`: the layout keeps that axis split over the
  mesh axes the name maps to (the mapped dimension of every constraint inside f is pinned to
  them, instead of being replicated), and constraints inside f leave those axes to it. The
  layout is the one active when the result is called (so vmaps nest)."""
  check_names((name,))

  def call(*args):
    layout = _active.get()
    if layout is None:
      return jax.vmap(f, in_axes=in_axes, out_axes=out_axes)(*args)
    mesh_axes = layout.mesh_axes(name)[0]

    def inner(*a):
      with use(layout.without(mesh_axes)):
        return f(*a)
    return jax.vmap(inner, in_axes=in_axes, out_axes=out_axes,
                    spmd_axis_name=mesh_axes or None)(*args)
  return call


def position(name: str):
  """Inside `shard_map`: the index of this device's block along logical `name` (0 when unsplit)."""
  check_names((name,))
  layout = _active.get()
  mesh_axes, n = layout.mesh_axes(name) if layout is not None else ((), 1)
  return jnp.int32(0) if n == 1 else jax.lax.axis_index(mesh_axes)


def pass_on(x, name: str, wrap: bool = True):
  """Inside `shard_map`: every device's block of x (a pytree) sent whole to the next device along
  the mesh axes of logical `name`, in one collective-permute per leaf; device i gets i - 1's.
  `wrap`: the last block goes to the first device (a ring); otherwise the first gets zeros."""
  check_names((name,))
  layout = _active.get()
  mesh_axes, n = layout.mesh_axes(name) if layout is not None else ((), 1)
  if n == 1 or not jax.tree.leaves(x):
    return x if wrap else jax.tree.map(jnp.zeros_like, x)
  pairs = [(i, i + 1) for i in range(n - 1)] + ([(n - 1, 0)] if wrap else [])
  return jax.lax.ppermute(x, mesh_axes, perm=pairs)


def rotate(x, name: str, axis: int = 0):
  """Inside `shard_map`: x's `axis` (logical `name`) rolled forward by one position over the
  whole array, so that index i moves to i + 1 and the last to 0. Each device's block passes its
  last entry to the next device along the mesh axes of `name` (one collective-permute)."""
  if ways(name) == 1:
    return jnp.roll(x, 1, axis)
  incoming = pass_on(jax.lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis), name)
  if x.shape[axis] == 1:
    return incoming
  rest = jax.lax.slice_in_dim(x, 0, x.shape[axis] - 1, axis=axis)
  return jnp.concatenate([incoming, rest], axis=axis)
