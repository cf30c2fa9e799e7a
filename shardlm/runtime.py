"""The model on a mesh: mesh, rules, model definition, parameter shardings and `apply()`.

Nothing here is about training: evaluation, generation, conversion and checkpoint restores use a
`Runtime` and never build an optimizer; `shardlm.train` adds the optimizer and the step on top.
"""
import dataclasses
import math

import jax
from flax import nnx

from shardlm import distributed, errors, kinds, sharding
from shardlm.checkpoint.format import Target, flat_names as checkpoint_names
from shardlm.errors import ConfigError
from shardlm.model import axes, pipeline
from shardlm.model.transformer import TransformerConfig

CHOICES = {'remat': ('none', 'full', 'selective'),
           'attention': ('dense', 'local', 'alternating'),
           'context_attention': ('allgather', 'ring'),
           'dtype': ('float32', 'bfloat16', 'float16'),
           'param_dtype': ('float32', 'bfloat16')}


@dataclasses.dataclass
class Runtime:
  """A model kind on a mesh. `params` everywhere is the pure dict of parameter arrays."""
  cfg: object
  mesh: jax.sharding.Mesh
  rules: tuple
  kind: kinds.Kind
  model_config: TransformerConfig
  graphdef: object           # the model's structure; nnx.merge(graphdef, params) gives the model
  abstract_params: dict      # jax.ShapeDtypeStruct per parameter: shapes, no memory
  param_names: dict          # the logical axis names of each parameter (tuples)
  param_shardings: dict
  batch_sharding: object     # NamedSharding of a batch (a tree of them for BERT)

  @property
  def replicated(self):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def sharding(self, names):
    """The NamedSharding of an array whose axes carry these logical names."""
    return sharding.named(self.mesh, self.rules, names)

  def rules_active(self):
    """The context in which the model's `constrain` calls pin layouts by this mesh's rules."""
    return axes.use(sharding.Layout(self.mesh, self.rules))

  def apply(self, params, *args, method: str = '__call__', **kwargs):
    """Calls the model (or one of its methods) with activation layouts pinned by the rules.

    For use inside a traced (jitted) function."""
    with self.rules_active():
      return getattr(nnx.merge(self.graphdef, params), method)(*args, **kwargs)

  def objective(self, params, batch, key=None):
    """(loss, extra metrics) of one batch: the kind's training objective; `key`: dropout's
    (training only)."""
    with self.rules_active():
      return self.kind.objective(nnx.merge(self.graphdef, params), batch, key)

  def constrain(self, x, names):
    """Pins an array to the layout its logical names map to (inside a traced function)."""
    with self.rules_active():
      return axes.constrain(x, names)

  def new_params(self, seed: int) -> dict:
    """The model's parameters drawn from `seed`; traced, or eager."""
    with nnx.use_eager_sharding(False):  # logical names are not mesh axes: the rules shard
      return nnx.to_pure_dict(nnx.state(self.kind.model(self.model_config, rngs=nnx.Rngs(seed)),
                                        nnx.Param))

  @property
  def stacked(self) -> dict:
    """Per parameter: whether it is a layer stack (its first axis `layers`)."""
    return jax.tree.map(lambda names: names[:1] == ('layers',), self.param_names,
                        is_leaf=lambda x: isinstance(x, tuple))

  def target(self) -> Target:
    """What a checkpoint's parameters are restored into, on this mesh."""
    mc = self.model_config
    return Target(abstract=self.abstract_params, shardings=self.param_shardings,
                  padded_vocab=mc.padded_vocab, kind=self.kind.name,
                  relatives=kinds.relatives(self.kind), heads=self.kind.heads,
                  mesh_shape=dict(self.mesh.shape),
                  stage_major=None if mc.layer_order is None else (mc.stages, mc.repeats),
                  stacked=frozenset(n for n, s in checkpoint_names(self.stacked).items() if s))

  def init_params(self, seed: int) -> dict:
    """Parameters created directly in their shards (jitted with out_shardings)."""
    return jax.jit(self.new_params, static_argnums=0, out_shardings=self.param_shardings)(seed)


def padded_vocab(model_cfg, vocab_ways: int) -> int:
  """Vocabulary padded to a multiple of vocab_multiple x the vocabulary's split (Megatron's rule:
  128 x the tensor-parallel size)."""
  m = model_cfg.vocab_multiple * vocab_ways
  return -(-model_cfg.vocab_size // m) * m if m else model_cfg.vocab_size


def check_model(cfg, shape: dict, rules) -> None:
  """The `model` section against itself and the mesh; the kind's own checks."""
  m = cfg.model
  kind = kinds.get(m.kind)
  for key in ('num_layers', 'hidden', 'num_heads', 'seq_len', 'vocab_size'):
    if m[key] <= 0:
      raise ConfigError(f'model.{key}={m[key]} must be positive')
  for key, allowed in CHOICES.items():
    if m[key] not in allowed:
      raise ConfigError(f"model.{key}='{m[key]}' is not one of {', '.join(allowed)}")
  if m.hidden % m.num_heads:
    raise ConfigError(f'model.hidden={m.hidden} is not divisible by model.num_heads={m.num_heads}')
  if m.mlp_dim < 0:
    raise ConfigError(f'model.mlp_dim={m.mlp_dim} must be >= 0 (0 means 4 x model.hidden)')
  for key in ('init_std', 'ln_eps'):
    if not (math.isfinite(m[key]) and m[key] > 0):
      raise ConfigError(f'model.{key}={m[key]} must be a positive number')
  if m.vocab_multiple < 0:
    raise ConfigError(f'model.vocab_multiple={m.vocab_multiple} must be >= 0 (0 turns padding off)')
  text = lambda name: sharding.split_text(shape, rules, name)
  heads = sharding.split_ways(shape, rules, 'heads')
  if m.num_heads % heads:
    divisors = [d for d in range(1, m.num_heads + 1) if m.num_heads % d == 0]
    raise ConfigError(f'model.num_heads={m.num_heads} is not divisible by {text("heads")}; the '
                      f"heads' split ({' x '.join(sharding.mapped_to(rules, 'heads'))}) must be one "
                      f'of {divisors}')
  for name in ('length', 'act_length'):  # context and sequence parallelism split T
    if m.seq_len % sharding.split_ways(shape, rules, name):
      raise ConfigError(f'model.seq_len={m.seq_len} is not divisible by {text(name)}, which '
                        f"split the sequence ('{name}')")
  mlp = m.mlp_dim or 4 * m.hidden
  if mlp % sharding.split_ways(shape, rules, 'mlp'):
    raise ConfigError(f'model.mlp_dim={mlp} is not divisible by {text("mlp")}')
  vocab = sharding.split_ways(shape, rules, 'vocab')
  if m.vocab_multiple == 0 and m.vocab_size % vocab:
    raise ConfigError(f'model.vocab_size={m.vocab_size} is not divisible by {text("vocab")} '
                      'and vocabulary padding is off (model.vocab_multiple=0); set '
                      'model.vocab_multiple=128')
  if m.attention != 'dense' and m.window <= 0:
    raise ConfigError(f"model.window={m.window} must be positive for model.attention='{m.attention}'")
  length = sharding.split_ways(shape, rules, 'length')
  if length > 1 and m.attention != 'dense' and m.window > m.seq_len // length:
    raise ConfigError(f'model.window={m.window} is longer than the sequence block per device '
                      f'(model.seq_len={m.seq_len} / {text("length")} = {m.seq_len // length}): '
                      'local attention under context parallelism takes its window from the '
                      'previous block only; use a window of at most that')
  if (length > 1 and m.attention == 'dense' and m.context_attention == 'ring'
      and kind.transformer['causal'] and m.seq_len % (2 * length)):
    raise ConfigError(f"model.seq_len={m.seq_len} is not divisible by 2 x {text('length')}: "
                      "causal ring attention cuts the sequence into 2 chunks per device (each "
                      "device takes an early and a late one, for equal work)")
  check_pipeline(m, shape.get('stage', 1))
  check_dropout(m, shape.get('stage', 1), length)
  if kind.packs and (m.attention != 'dense' or (length > 1 and m.context_attention == 'ring')):
    raise ConfigError(f"model.kind='{m.kind}' packs examples into rows with segment ids, which "
                      "needs model.attention='dense' (and under context parallelism "
                      "model.context_attention='allgather')")
  kind.check(cfg)


def check_dropout(m, stages: int, length: int) -> None:
  for key in ('dropout', 'attention_dropout'):
    if not 0 <= m[key] < 1:
      raise ConfigError(f'model.{key}={m[key]} must be in [0, 1) (Megatron fine-tuning: 0.1)')
  if (m.dropout or m.attention_dropout) and stages > 1:
    raise ConfigError(f'model.dropout={m.dropout}, model.attention_dropout={m.attention_dropout}: '
                      'dropout under the pipeline (mesh.stage > 1) is not built yet; set both to 0 '
                      'or mesh.stage=1')
  if m.attention_dropout and (m.attention != 'dense' or (length > 1 and m.context_attention == 'ring')):
    raise ConfigError(f'model.attention_dropout={m.attention_dropout} needs model.attention=dense '
                      "with the keys whole (not model.context_attention='ring' under context "
                      'parallelism); model.dropout works with every kernel')


def pipeline_shape(model_cfg, stages: int) -> dict:
  """P, R, M of the pipeline (P = 1: none), as TransformerConfig takes them."""
  if stages == 1:
    return dict(stages=1, repeats=1, microbatches=1)
  return dict(stages=stages, repeats=model_cfg.pipeline_repeats,
              microbatches=model_cfg.pipeline_microbatches or stages)


def pipeline_line(mc: TransformerConfig, rows: int) -> str:
  """One line for the log: P, R, M, the micro-batch and the bubble."""
  P, R, M = mc.stages, mc.repeats, mc.microbatches
  K = mc.num_layers // (P * R)
  return (f'pipeline: P={P} stages x R={R} repeat{"s" * (R > 1)} of {K} layer{"s" * (K > 1)}, '
          f'M={M} micro-batches of {rows // M} rows; {R * M + P - 1} iterations, '
          f'bubble (P-1)/(RM+P-1) = {P - 1}/{R * M + P - 1} = '
          f'{100 * pipeline.bubble(P, R, M):.1f}%')


def context_line(mc: TransformerConfig, blocks: int) -> str:
  """One line for the log under context parallelism: T's blocks and how attention crosses them."""
  how = {'dense': mc.context_attention, 'local': f'halo of W={mc.window}',
         'alternating': f'{mc.context_attention} (dense layers), halo of W={mc.window} (local)'}
  order = ('; zigzag order (each device an early and a late chunk)'
           if mc.attention == 'dense' and mc.causal and mc.context_attention == 'ring' else '')
  return (f'context: T={mc.seq_len} in {blocks} blocks of {mc.seq_len // blocks}; attention '
          f'{how[mc.attention]}{order}')


def check_pipeline(m, stages: int) -> None:
  """The pipeline's repeats and micro-batches against the layers and mesh.stage."""
  R, M = m.pipeline_repeats, m.pipeline_microbatches
  if R < 1:
    raise ConfigError(f'model.pipeline_repeats={R} must be >= 1 (1: GPipe; R > 1: circular)')
  if M < 0:
    raise ConfigError(f'model.pipeline_microbatches={M} must be >= 0 (0: as many as mesh.stage)')
  P = stages
  if P == 1:
    if R > 1 or M > 0:
      errors.warn(f'model.pipeline_repeats={R}, model.pipeline_microbatches={M} do nothing '
                  'without a pipeline: set mesh.stage > 1')
    return
  if m.num_layers % (R * P):
    fits = [r for r in range(1, m.num_layers + 1) if m.num_layers % (r * P) == 0]
    stages = [p for p in range(2, m.num_layers + 1) if m.num_layers % p == 0]
    raise ConfigError(f'model.num_layers={m.num_layers} is not divisible by mesh.stage={P} x '
                      f'model.pipeline_repeats={R}; '
                      + (f'with mesh.stage={P} the repeats may be {fits}' if fits else
                         f'mesh.stage may be one of {stages} (divisors of the layers)'))
  if M and M % P:
    raise ConfigError(f'model.pipeline_microbatches={M} is not a multiple of mesh.stage={P} '
                      f'(e.g. {P}, {2 * P}, {4 * P}; 0 means {P})')
  if R > 1 and m.remat == 'none':
    errors.warn(f"model.pipeline_repeats={R} with model.remat='none' keeps a copy of each stage's "
                'layers for every pipeline iteration, for the backward pass; '
                "model.remat='selective' or 'full' recomputes it instead")


def build(cfg, devices=None) -> Runtime:
  """The model of `cfg` on a mesh of `devices` (default: all); validated before anything runs."""
  devices = list(devices if devices is not None else jax.devices())
  shape = sharding.mesh_shape(cfg, len(devices))
  rules = sharding.rules_from_config(cfg)
  check_model(cfg, shape, rules)
  kind = kinds.get(cfg.model.kind)
  mesh = sharding.make_mesh(shape, devices, distributed.host_of, cfg.dist.allow_model_across_hosts)
  vocab = padded_vocab(cfg.model, sharding.split_ways(shape, rules, 'vocab'))
  mc = TransformerConfig.from_config(cfg.model, vocab,
                                     **{'num_labels': len(cfg.data.labels), **kind.transformer},
                                     **pipeline_shape(cfg.model, shape.get('stage', 1)))

  # Abstract: shapes and logical names only, no memory.
  with nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(lambda: kind.model(mc, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(abstract_model, nnx.Param)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
  names = jax.tree.map(tuple, logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  param_shardings = sharding.logical_to_sharding(logical, mesh, rules)
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                 nnx.to_pure_dict(abstract))
  sharding.check_divisible(abstract_params, param_shardings, 'parameter')
  batch_sharding = jax.tree.map(lambda names: sharding.named(mesh, rules, names), kind.batch_axes,
                                is_leaf=lambda x: isinstance(x, tuple))
  return Runtime(cfg=cfg, mesh=mesh, rules=rules, kind=kind, model_config=mc, graphdef=graphdef,
                 abstract_params=abstract_params, param_names=names, param_shardings=param_shardings,
                 batch_sharding=batch_sharding)
