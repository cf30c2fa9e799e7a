"""The logical axis alphabet and `constrain`: the only part of shardlm that model code imports.

Model code names axes with these logical names only; the rule table (shardlm.sharding) maps them
onto mesh axes. A name outside the alphabet is an error when the model is traced, never a silent
"replicated".
"""
import contextlib
import contextvars

# DESIGN.md, "The dimension alphabet": parameter names, then activation names.
PARAM_NAMES = ('embed', 'mlp', 'heads', 'kv', 'vocab', 'layers', 'stage')
ACTIVATION_NAMES = ('batch', 'length', 'act_length', 'act_embed', 'act_mlp', 'act_heads',
                    'act_vocab', 'act_stage')
LOGICAL_NAMES = PARAM_NAMES + ACTIVATION_NAMES

# The active pin: (array, logical names) -> the array constrained to the layout the rule table
# gives those names. Set by the runtime, which knows the mesh and the rules; model code never
# sees either.
_active = contextvars.ContextVar('shardlm_pin', default=None)


def check_names(names, where: str = 'logical axes') -> None:
  """Raises ValueError if any name (None aside) is outside the alphabet."""
  for name in names:
    if name is not None and name not in LOGICAL_NAMES:
      raise ValueError(f"{where} {tuple(names)} name unknown logical axis '{name}'; "
                       f"the alphabet (DESIGN.md): {', '.join(LOGICAL_NAMES)}")


@contextlib.contextmanager
def use(pin):
  """Makes `constrain` active while tracing: `pin(x, names)` pins x's layout."""
  token = _active.set(pin)
  try:
    yield
  finally:
    _active.reset(token)


def constrain(x, names):
  """Pins an activation to the layout its logical names map to; a no-op outside `use`."""
  check_names(names)
  pin = _active.get()
  return x if pin is None else pin(x, names)
