"""Compiler checks: the collectives XLA emits for each preset match Megatron's and ZeRO-3's counts."""
import math

import jax
import jax.numpy as jnp
import pytest

from shardlm import config, hlo, train

# D=160 and T=64 differ from every vocabulary size (384, 512, 128), so shapes are unambiguous.
B, T, D, L = 32, 64, 160, 2


def lowered_step(preset, mesh, rules=(), remat='none'):
  cfg = config.load('tiny')
  for key, value in dict(model__hidden=D, model__seq_len=T, model__num_layers=L, model__remat=remat,
                         model__scan_layers=True,  # the layer loop, as every large config runs it
                         data__batch_size=B, sharding__preset=preset, sharding__rules=repr(rules),
                         **{f'mesh__{k}': v for k, v in mesh.items()}).items():
    config.override(cfg, key.replace('__', '.'), str(value))
  s = train.setup(cfg)
  return s, s.step.lower(jax.eval_shape(s.init), jax.ShapeDtypeStruct((B, T + 1), jnp.int32))


def megatron_violations(module, s, remat):
  """Everything in the compiled step that departs from Megatron's communication pattern."""
  data, model = s.rt.mesh.shape['data'], s.rt.mesh.shape['model']
  vocab = s.rt.model_config.padded_vocab
  act = ('f32', (B // data, T, D))
  # The projections are 2D matmuls over B x T rows, so an activation may travel flattened.
  acts = [[act], [('f32', (B // data * T, D))]]
  rows = {T, B // data * T, B * T}  # a logits array has one of these (and the vocabulary)
  problems = []

  def is_act_allreduce(i):
    return i.op.startswith('all-reduce') and i.shapes in acts and i.group_size == model

  loops = [b for b in module.while_bodies if module.collectives(computation=b)]
  if len(loops) != 2:
    problems.append(f'expected a forward and a backward layer loop with collectives, found {loops}')
  for body in loops:
    ops = module.collectives(computation=body)
    backward = any('transpose(' in i.line for i in ops)
    n = sum(map(is_act_allreduce, ops))
    allowed = range(2, 5) if backward and remat == 'full' else (2,)
    if n not in allowed:
      problems.append(f"{'backward' if backward else 'forward'} layer: {n} all-reduces of "
                      f'{act} over the model axis, expected {list(allowed)}')
    for i in ops:
      if not is_act_allreduce(i) and not (i.op.startswith('all-reduce') and i.group_size == data):
        problems.append(f'unexpected collective in a layer: {i.op} {i.shapes} group {i.group_size}')
  for i in module.collectives():
    if i.op.startswith('all-gather'):
      problems.append(f'all-gather {i.shapes}: Megatron tensor parallelism never gathers')
    for _, dims in i.shapes:
      if rows & set(dims) and (vocab in dims or vocab // model in dims):
        problems.append(f'{i.op} carries logits {dims}')
  return problems


MEGATRON_MESH = dict(data=2, fsdp=1, model=4)


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_megatron_communication(remat):
  s, lowered = lowered_step('megatron', MEGATRON_MESH, remat=remat)
  module = hlo.parse(lowered.compile().as_text())
  assert megatron_violations(module, s, remat) == []


@pytest.mark.parametrize('wrong_rule', [
    ('act_mlp', None),    # MLP hidden replicated: the layer must gather it
    ('act_vocab', None),  # logits replicated: the partitioner gathers the vocabulary
    ('heads', None),      # attention weights replicated: gathered from their shards
])
def test_megatron_check_catches_a_broken_rule(wrong_rule):
  s, lowered = lowered_step('megatron', MEGATRON_MESH, rules=(wrong_rule,))
  assert megatron_violations(hlo.parse(lowered.compile().as_text()), s, 'none') != []


def _uses_only_slices(module, name, depth=0):
  """True if every path from `name` ends in a dynamic-slice (shape-only ops in between)."""
  users = module.users(name)
  if not users or depth > 4:
    return False
  return all(u.op == 'dynamic-slice' or (u.op in ('reshape', 'bitcast', 'copy', 'transpose')
                                         and _uses_only_slices(module, u.name, depth + 1))
             for u in users)


def test_fsdp_gathers_parameters_and_scatters_gradients():
  s, lowered = lowered_step('fsdp', dict(data=1, fsdp=8, model=1))
  fsdp = s.rt.mesh.shape['fsdp']
  params = jax.eval_shape(s.init)['params']
  # Sizes of every parameter that FSDP shards (one layer's slice for the stacked layers).
  sizes = set()
  for (path, p), sh in zip(jax.tree_util.tree_leaves_with_path(params),
                           jax.tree.leaves(s.state_shardings['params'])):
    if 'fsdp' in str(sh.spec):
      stacked = path[0].key == 'h'
      sizes.add(math.prod(p.shape[1:] if stacked else p.shape))
  smallest_matrix = min(sz for sz in sizes if sz > D)

  module = hlo.parse(hlo.partitioned_text(lowered))
  gathered = {math.prod(i.shapes[0][1]) for i in module.collectives('all-gather')}
  assert sizes <= gathered, f'parameters never all-gathered: sizes {sorted(sizes - gathered)}'

  grads = [i for i in module.collectives('all-reduce')
           if i.shapes and math.prod(i.shapes[0][1]) >= smallest_matrix and i.group_size == fsdp]
  assert grads, 'no gradient reduction found'
  # XLA:CPU has no reduce-scatter creator pass, so a reduce-scatter appears as an all-reduce
  # whose only use is the slice each device keeps (GPU/TPU pipelines fuse the two).
  whole = [(i.shapes, [u.op for u in module.users(i.name)]) for i in grads
           if not _uses_only_slices(module, i.name)]
  assert whole == [], f'gradients all-reduced and used whole: {whole}'


def test_fsdp_check_catches_replicated_gradients():
  """With embed unsharded (dp rules on an fsdp mesh) gradients are all-reduced and kept whole."""
  _, lowered = lowered_step('fsdp', dict(data=1, fsdp=8, model=1), rules=(('embed', None),))
  module = hlo.parse(hlo.partitioned_text(lowered))
  big = [i for i in module.collectives('all-reduce')
         if i.shapes and math.prod(i.shapes[0][1]) >= D * D]
  assert big and not all(_uses_only_slices(module, i.name) for i in big)


# -- sequence parallelism (Korthikanti et al. 2022) -------------------------------------------------

def sequence_parallel_violations(module, s):
  """What in each layer loop departs from Megatron-SP: per layer, forward and backward, two
  all-gathers of the activation from its T/t shards, and two reduce-scatters of it, where XLA:CPU
  writes a reduce-scatter as an all-reduce whose only use is the slice each device keeps (read
  right after SPMD partitioning, as for FSDP); no activation all-reduce kept whole."""
  data, t = s.rt.mesh.shape['data'], s.rt.mesh.shape['model']
  full = B // data * T * D  # the activation a data-parallel shard holds, B x T x D
  problems = []
  loops = [b for b in module.while_bodies if module.collectives(computation=b)]
  if len(loops) != 2:
    problems.append(f'expected a forward and a backward layer loop, found {loops}')
  for body in loops:
    acts = [i for i in module.collectives(computation=body) if i.group_size == t
            and i.shapes and math.prod(i.shapes[0][1]) == full]
    gathers = [i for i in acts if i.op.startswith('all-gather')]
    scatters = [i for i in acts if i.op.startswith('all-reduce') and _uses_only_slices(module, i.name)]
    whole = [i for i in acts if i.op.startswith('all-reduce') and i not in scatters]
    if whole:
      problems.append(f'{body}: {len(whole)} all-reduces of the activation kept whole')
    if (len(gathers), len(scatters)) != (2, 2):
      problems.append(f'{body}: {len(gathers)} all-gathers and {len(scatters)} reduce-scatters of '
                      f'the activation per layer, expected 2 and 2')
    for i in gathers:  # gathered from T/t shards: each device sent B x T x D / t
      operand = next(x for x in module.instrs if x.name == i.operands[0])
      if math.prod(operand.shapes[0][1]) * t != full:
        problems.append(f'{body}: all-gather of {operand.shapes} is not B x T x D / {t}')
    for i in scatters:  # ... and keeps B x T x D / t of each reduction
      kept = [u for u in module.users(i.name) if u.op == 'dynamic-slice'] or [
          u for v in module.users(i.name) for u in module.users(v.name) if u.op == 'dynamic-slice']
      if not kept or any(math.prod(u.shapes[0][1]) * t != full for u in kept):
        problems.append(f'{body}: reduce-scatter keeps {[u.shapes for u in kept]}, not B x T x D / {t}')
    # Anything else of an activation's size in a layer is a departure (parameter gradients are
    # reduced over data, or over model for the LayerNorms that the residual split now shares).
    for i in module.collectives(computation=body):
      if i not in acts and i.shapes and math.prod(i.shapes[0][1]) >= full // t:
        problems.append(f'{body}: unexpected {i.op} {i.shapes} over {i.group_size} devices')
  vocab, rows = s.rt.model_config.padded_vocab, {T, B // data * T, B * T}
  for i in module.collectives():  # the logits stay split on V, as under megatron
    for _, dims in i.shapes:
      if rows & set(dims) and (vocab in dims or vocab // t in dims):
        problems.append(f'{i.op} carries logits {dims}')
  return problems


def test_megatron_sp_scatters_and_gathers_instead_of_all_reducing():
  s, lowered = lowered_step('megatron_sp', MEGATRON_MESH)
  assert sequence_parallel_violations(hlo.parse(hlo.partitioned_text(lowered)), s) == []


# ('heads', None) alone is no such case here: the activations stay split on heads, so only the
# weights' memory shows it (megatron's check sees it through their gradients' all-reduces).
@pytest.mark.parametrize('wrong_rule', [('act_length', None), ('act_mlp', None), ('act_vocab', None)])
def test_sequence_parallel_check_catches_a_broken_rule(wrong_rule):
  s, lowered = lowered_step('megatron_sp', MEGATRON_MESH, rules=(wrong_rule,))
  assert sequence_parallel_violations(hlo.parse(hlo.partitioned_text(lowered)), s), wrong_rule


def per_layer_temp_bytes(preset, remat, rules=()):
  """Compiled temporary bytes per layer per device (24 layers minus 12, over 12), bf16, t = 4."""
  def temp(layers):
    cfg = config.load('tiny')
    for key, value in {'model.num_layers': layers, 'model.hidden': 256, 'model.num_heads': 8,
                       'model.seq_len': 256, 'model.vocab_size': 256, 'model.dtype': 'bfloat16',
                       'model.remat': remat, 'model.scan_layers': True, 'data.batch_size': 16,
                       'mesh.data': 2, 'mesh.model': 4, 'sharding.preset': preset,
                       'sharding.rules': repr(rules)}.items():
      config.override(cfg, key, str(value))
    s = train.setup(cfg)
    step = s.step.lower(jax.eval_shape(s.init), jax.ShapeDtypeStruct((16, 257), jnp.int32))
    return step.compile().memory_analysis().temp_size_in_bytes
  return (temp(24) - temp(12)) / 12


def korthikanti_ratio(remat, a=8, s=256, h=256, t=4):
  """Activation memory per layer, sequence parallel over tensor parallel (Korthikanti et al. 2022,
  Table 2): sbh(34/t + 5as/(ht)) against sbh(10 + 24/t + 5as/(ht)); with selective recomputation
  the attention term (5as/(ht)) is recomputed, not stored."""
  attention = 5 * a * s / (h * t) if remat == 'none' else 0
  return (34 / t + attention) / (10 + 24 / t + attention)


@pytest.mark.parametrize('remat', ['none', 'selective'])
def test_megatron_sp_saves_activation_memory_as_korthikanti_predicts(remat):
  """Per-layer compiled temporaries (24 layers minus 12) fall from megatron to megatron_sp as the
  paper's formulas predict, within 25%; splitting nothing on T (a wrong rule) saves nothing.
  Measured on this machine: none 0.77 against 0.71, selective 0.64 against 0.53."""
  tp = per_layer_temp_bytes('megatron', remat)
  sp = per_layer_temp_bytes('megatron_sp', remat)
  predicted = korthikanti_ratio(remat)
  print(f'\n{remat}: per layer megatron {tp / 2**20:.2f} MiB, megatron_sp {sp / 2**20:.2f} MiB, '
        f'ratio {sp / tp:.3f}, Korthikanti {predicted:.3f}')
  assert abs(sp / tp / predicted - 1) < 0.25
  if remat == 'selective':
    wrong = per_layer_temp_bytes('megatron_sp', remat, rules=(('act_length', None),))
    assert abs(wrong / tp / predicted - 1) > 0.25, wrong / tp
