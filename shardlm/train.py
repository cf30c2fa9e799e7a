"""`python -m shardlm.train --config NAME [--config.a.b=value ...]`: train a GPT on any mesh layout."""
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from shardlm import checkpoint, config as config_lib, optim, perf, sharding
from shardlm.config import ConfigError
from shardlm.data import bert as bert_data, loader, tokenizer as tokenizer_lib
from shardlm.model import bert, gpt
from shardlm.model.transformer import TransformerConfig

MODELS = {'gpt': (gpt.GPT, gpt.objective, gpt.BATCH_AXES),
          'bert': (bert.BERT, bert.objective, bert.BATCH_AXES)}


@dataclasses.dataclass
class Setup:
  """Everything the loop needs, built from the config before any data is read."""
  cfg: object
  mesh: jax.sharding.Mesh
  rules: tuple
  model_config: TransformerConfig
  graphdef: object        # the model's structure; nnx.merge(graphdef, params) gives the model
  state_shardings: dict
  batch_sharding: object  # NamedSharding of a batch (a tree of them for BERT)
  init: object        # jitted: () -> state, created directly in its sharded layout
  init_with: object   # jitted: params -> state with those parameters and a fresh optimizer
  step: object        # jitted: (state, batch) -> (state, metrics); state donated
  eval_loss: object   # jitted: (params, batch) -> loss
  eval_metrics: object  # jitted: (params, batch) -> (loss, extra metrics such as BERT's sop_acc)
  grads: object       # jitted: (params, batch) -> (loss, gradients), in micro-batches
  schedule: object


def setup(cfg, devices=None) -> Setup:
  devices = list(devices if devices is not None else jax.devices())

  # Mesh and rule table: validated against the device count before anything is compiled.
  mesh_shape = config_lib.validate(cfg, len(devices))
  mesh = sharding.make_mesh(mesh_shape, devices)
  rules = sharding.rules_from_config(cfg)
  mc = TransformerConfig.from_config(cfg.model, config_lib.padded_vocab(cfg, mesh.shape['model']))
  Model, objective, batch_axes = MODELS[cfg.model.kind]

  # Model and optimizer, abstract: shapes and logical names only, no memory.
  tx, schedule = optim.make(cfg.optimizer, cfg.train.steps)
  abstract_model = nnx.eval_shape(lambda: Model(mc, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  param_shardings = sharding.logical_to_sharding(logical, mesh, rules)
  sharding.check_divisible(nnx.to_pure_dict(abstract_params), param_shardings, 'parameter')
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, nnx.to_pure_dict(abstract_params))
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  state_shardings = {'step': replicated, 'params': param_shardings, 'opt_state': opt_shardings}
  scaled = mc.dtype == 'float16'  # dynamic loss scaling; bfloat16 keeps float32's range
  if scaled:
    state_shardings['loss_scale'] = {k: replicated for k in ('scale', 'good_steps', 'hysteresis')}
  batch_sharding = jax.tree.map(lambda names: sharding.named(mesh, rules, names), batch_axes,
                                is_leaf=lambda x: isinstance(x, tuple))

  # Initialization: jitted with out_shardings, so every array is born in its shard.
  def init():
    return init_with(nnx.to_pure_dict(nnx.state(Model(mc, rngs=nnx.Rngs(cfg.train.seed)), nnx.Param)))

  def init_with(params):
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
    if scaled:
      state['loss_scale'] = optim.loss_scale_init(cfg.optimizer)
    return state

  def loss_and_metrics(params, batch):
    with sharding.use(mesh, rules):
      return objective(nnx.merge(graphdef, params), batch)

  def grads(params, batch, scale):
    """Mean loss, metrics and gradients over the batch, micro-batches accumulated by a scan."""
    def scaled_loss(p, b):
      loss, extra = loss_and_metrics(p, b)
      return loss * scale, (loss, extra)
    grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)
    k = cfg.optimizer.grad_accum_steps
    if k == 1:
      (_, (loss, extra)), g = grad_fn(params, batch)
    else:
      # Micro-batch i takes rows i, i+k, ...: each device holds an equal share of every one.
      def split(x, names):
        x = x.reshape(-1, k, *x.shape[1:]).swapaxes(0, 1)
        with sharding.use(mesh, rules):
          return sharding.constrain(x, (None, *names))
      micro = jax.tree.map(split, batch, batch_axes, is_leaf=lambda x: isinstance(x, tuple))

      def body(acc, b):
        (_, out), g = grad_fn(params, b)
        return jax.tree.map(jnp.add, acc, (out, g)), None
      (_, out), _ = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
      zeros = (jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), out),
               jax.tree.map(jnp.zeros_like, params))
      ((loss, extra), g), _ = jax.lax.scan(body, zeros, micro)
      loss, extra, g = jax.tree.map(lambda x: x / k, (loss, extra, g))
    return loss, extra, jax.tree.map(lambda x: x / scale, g)

  # Step function: a pure (state, batch) -> (state, metrics); metrics stay on device.
  def train_step(state, batch):
    scale = state['loss_scale']['scale'] if scaled else jnp.float32(1)
    loss, extra, g = grads(state['params'], batch, scale)
    updates, opt_state = tx.update(g, state['opt_state'], state['params'])
    new_state = {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
                 'opt_state': opt_state}
    # The learning rate of this update: the optimizer's own count, which a skipped (float16
    # overflow) step does not advance, so the schedule waits for it as Megatron's does.
    applied = optax.tree_utils.tree_get_all_with_path(state['opt_state'], 'count')[0][1]
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(g), 'lr': schedule(applied), **extra}
    if scaled:  # an overflowing step leaves parameters and optimizer state as they were
      finite = optim.all_finite(g)
      for key in ('params', 'opt_state'):
        new_state[key] = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                      new_state[key], state[key])
      new_state['loss_scale'] = optim.loss_scale_update(state['loss_scale'], finite, cfg.optimizer)
      metrics.update(loss_scale=scale, skipped=~finite)
    return new_state, metrics

  return Setup(
      cfg=cfg, mesh=mesh, rules=rules, model_config=mc, graphdef=graphdef,
      state_shardings=state_shardings,
      batch_sharding=batch_sharding,
      init=jax.jit(init, out_shardings=state_shardings),
      init_with=jax.jit(init_with, in_shardings=(param_shardings,), out_shardings=state_shardings),
      step=jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval_loss=jax.jit(lambda p, b: loss_and_metrics(p, b)[0],
                        in_shardings=(param_shardings, batch_sharding), out_shardings=replicated),
      eval_metrics=jax.jit(loss_and_metrics, in_shardings=(param_shardings, batch_sharding),
                           out_shardings=replicated),
      grads=jax.jit(lambda p, b: (lambda loss, _, g: (loss, g))(*grads(p, b, jnp.float32(1))),
                    in_shardings=(param_shardings, batch_sharding),
                    out_shardings=(replicated, param_shardings)),
      schedule=schedule)


class Logger:
  """Log lines on stdout (process 0), a JSONL metrics file and TensorBoard events."""

  def __init__(self, run_dir: Path, cfg):
    self.enabled = jax.process_index() == 0
    self.run_dir, self.cfg = run_dir, cfg
    self.metrics_path = run_dir / 'metrics.jsonl'
    self.tb_dir = run_dir / 'tensorboard'
    self.writer = None

  def start(self, step: int):
    """Opens the files once the first step is known; nothing is written before.

    Resuming at `step` keeps the metrics records before it (and its training record) and drops
    the later ones: a killed run logged them after its last checkpoint, and they come again.
    """
    if not self.enabled:
      return
    self.run_dir.mkdir(parents=True, exist_ok=True)
    (self.run_dir / 'config.json').write_text(self.cfg.to_json(indent=2))
    kept = []
    if step and self.metrics_path.exists():
      for line in self.metrics_path.read_text().splitlines():
        try:
          r = json.loads(line)
        except ValueError:
          continue  # a line cut short by the kill
        if r['step'] < step or (r['step'] == step and 'val_loss' not in r):
          kept.append(line + '\n')
    tmp = self.metrics_path.with_name('metrics.jsonl.tmp')
    tmp.write_text(''.join(kept))
    tmp.replace(self.metrics_path)  # atomic: a kill leaves the old file or the new one
    if self.cfg.log.tensorboard:
      from tensorboardX import SummaryWriter
      # purge_step: TensorBoard hides what a killed run wrote past the resumed step.
      self.writer = SummaryWriter(str(self.tb_dir), purge_step=step + 1 if step else None)

  def print(self, *args):
    if self.enabled:
      print(*args, flush=True)

  def write(self, step: int, record: dict):
    if not self.enabled:
      return
    with self.metrics_path.open('a') as f:
      f.write(json.dumps({'step': step, **record}) + '\n')
    if self.writer:
      for k, v in record.items():
        self.writer.add_scalar(k, v, step)

  def close(self):
    if self.writer:
      self.writer.close()


def _duration(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  return f'{m}m{s:02d}s' if m else f'{s}s'


def make_data(cfg, tok):
  """(loader.Data, train batches, validation batches) for the model kind, checked against the
  model's vocabulary. BERT rows are built from GPT samples of T-3 tokens (data/bert.py)."""
  T, B = cfg.model.seq_len, cfg.data.batch_size
  bert = cfg.model.kind == 'bert'
  needed = bert_data.vocab_size(tok) if bert else tok.vocab_size
  if needed > cfg.model.vocab_size:
    what = "BERT's ids (the tokenizer's and [CLS] [SEP] [MASK] [PAD])" if bert else 'ids'
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than tokenizer "
                      f"{tok.name}'s {needed} {what}; set model.vocab_size >= {needed}")
  if not bert:
    data = loader.from_config(cfg.data, tok, T, B)
    return data, data.train, data.validation
  data = loader.from_config(cfg.data, tok, T - 4, B)
  make = lambda samples, seed: bert_data.BertBatches(
      samples, tok, T, seed, mask_prob=cfg.data.mlm_prob, whole_word=cfg.data.whole_word)
  return data, make(data.train, cfg.data.seed), make(data.validation, cfg.data.seed + 1)


def _summary(record: dict) -> str:
  """' | mlm_loss 2.91 | sop_acc 0.62'-style text for the extra metrics of a record."""
  return ''.join(f' | {k} {v:.4g}' for k, v in record.items())


def train(cfg) -> dict:
  """Runs the whole job; returns the final metrics."""
  s = setup(cfg)
  m, B, T = s.model_config, cfg.data.batch_size, cfg.model.seq_len

  # Data: memory-mapped indexed datasets (the built-in corpus is preprocessed into the cache on
  # first use), split by documents, blended; batches indexed by step. Opened and checked before
  # the run directory exists, so that a bad data setting or file leaves nothing behind.
  tok = tokenizer_lib.get_tokenizer(cfg.data.tokenizer)
  data, train_data, val_data = make_data(cfg, tok)

  run_dir = Path(cfg.train.run_dir or f'runs/{cfg.name}')
  log = Logger(run_dir, cfg)
  log.print(f'shardlm: config {cfg.name}; {jax.device_count()} {jax.devices()[0].platform} '
            f'device(s), {jax.process_count()} process(es); {sharding.describe(s.mesh, s.rules)}')
  log.print(f'data: {data.summary}; global batch {B} x {T}')

  # Model and optimizer state: restored from the latest good checkpoint (train.resume=auto) or a
  # named one, straight into this mesh's shardings, else created sharded; the step compiled ahead
  # of time. The run directory is written only after this, so a bad checkpoint leaves no trace.
  t0 = time.perf_counter()
  ckpt = checkpoint.Checkpoints(cfg, run_dir, s, tok)
  state, start, source = ckpt.restore()
  if state is None and cfg.train.init_from:  # imported or exported weights, a fresh optimizer
    params, path, meta = checkpoint.restore_params(cfg.train.init_from, s, 'train.init_from')
    theirs = meta['tokenizer'].get('fingerprint')
    if meta['tokenizer']['name'] == 'none':  # converted without tokenizer files: trust the config
      log.print(f'note: {path} records no tokenizer; using data.tokenizer={tok.name}')
    elif theirs != getattr(tok, 'fingerprint', tok.name):
      raise ConfigError(f"train.init_from={path} was made with tokenizer {meta['tokenizer']['name']}, "
                        f"this config uses {tok.name}; set data.tokenizer to match")
    state = s.init_with(params)
    log.print(f'initialized: parameters from {path}')
  if state is None:
    state = s.init()
  log.start(start)
  if source:
    log.print(f'resumed: step {start} from {source}'
              + (' (train.steps; raise it to train on)' if start == cfg.train.steps else ''))
  n_params = sum(x.size for x in jax.tree.leaves(state['params']))
  step_fn = s.step.lower(state, train_data.global_batch(start, s.batch_sharding)).compile()
  log.print(f'model: {n_params:,} parameters (vocabulary {m.vocab_size} padded to {m.padded_vocab}); '
            f'compiled in {time.perf_counter() - t0:.1f}s')
  flops_per_step = perf.gpt_flops_per_step(B, T, m.num_layers, m.hidden, m.padded_vocab)
  peak, peak_source = perf.device_peak()
  log.print(f'peak: {peak / 1e9:.1f} GFLOP/s ({peak_source}); {flops_per_step / 1e9:.2f} GFLOP per step')

  def validate(step: int) -> float:
    results = jax.device_get([s.eval_metrics(state['params'], val_data.global_batch(i, s.batch_sharding))
                              for i in range(cfg.train.eval_batches)])
    val = float(np.mean([loss for loss, _ in results]))
    extra = {f'val_{k}': float(np.mean([e[k] for _, e in results])) for k in results[0][1]}
    ppl = '' if extra else f' | ppl {np.exp(val):.2f}'  # BERT's loss adds MLM and SOP: no ppl
    log.print(f'step {step:>6} | validation loss {val:.4f}{ppl}{_summary(extra)}')
    log.write(step, {'val_loss': val, **extra})
    return val

  # Loop: metrics are read back only at log intervals, so the host never stalls the device.
  # Checkpoints every checkpoint.every steps and at the end, written while training goes on.
  first_val = validate(start)
  total = cfg.train.steps
  pending, t_log, t_start, last = [], time.perf_counter(), time.perf_counter(), {}
  for step in range(start, total):
    state, metrics = step_fn(state, train_data.global_batch(step, s.batch_sharding))
    pending.append(metrics)
    done = step + 1
    if done % cfg.log.every == 0 or done == total:
      host = jax.device_get(pending)
      now = time.perf_counter()
      dt, n = now - t_log, len(host)
      tokens_s = n * B * T / dt
      flops_s = n * flops_per_step / dt
      kept = [h for h in host if not h.get('skipped', False)] or host  # an overflow's loss is inf
      last = {'loss': float(np.mean([h['loss'] for h in kept])),
              'grad_norm': float(host[-1]['grad_norm']), 'lr': float(host[-1]['lr']),
              'tokens_per_s': tokens_s, 'tflops_per_device': flops_s / jax.device_count() / 1e12,
              'mfu': flops_s / peak, 'step_time_s': dt / n}
      # The model's own metrics (BERT: mlm_loss, sop_acc) averaged; float16: the loss scale now
      # and the steps skipped on overflow in this interval.
      extra = {k: float(np.mean([h[k] for h in host])) for k in host[-1]
               if k not in ('loss', 'grad_norm', 'lr', 'loss_scale', 'skipped')}
      if 'loss_scale' in host[-1]:
        extra.update(loss_scale=float(host[-1]['loss_scale']),
                     skipped=int(sum(bool(h['skipped']) for h in host)))
      last.update(extra)
      eta = (now - t_start) / (done - start) * (total - done)
      bar = '#' * int(20 * done / total)
      log.print(f'step {done:>6}/{total} [{bar:<20}] loss {last["loss"]:.4f} | '
                f'grad norm {last["grad_norm"]:.3f} | lr {last["lr"]:.2e} | {tokens_s:,.0f} tok/s | '
                f'{last["tflops_per_device"] * 1e3:.2f} GFLOP/s/device | MFU {100 * last["mfu"]:.1f}%'
                f'{_summary(extra)} | ETA {_duration(eta)}')
      log.write(done, last)
      pending, t_log = [], now
    if ckpt.due(done):
      saved = ckpt.save(done, state)  # returns once the state is copied off the devices
      if saved:
        log.print(f'checkpoint: step {done} -> {saved}')
    if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != total:
      validate(done)
  final_val = validate(total) if total > start else first_val
  committed = ckpt.close()  # waits for the last checkpoint to commit
  log.close()
  log.print(f'done: {total} steps{f" (resumed at {start})" if start else ""} in '
            f'{_duration(time.perf_counter() - t_start)}; validation loss {first_val:.4f} -> '
            f'{final_val:.4f} ({100 * final_val / first_val:.0f}% of the first)')
  log.print(f'run directory: {run_dir.resolve()}')
  log.print(f'metrics:       {log.metrics_path.resolve()}')
  log.print(f'checkpoints:   {ckpt.dir.resolve()} (steps {", ".join(map(str, committed))})')
  if log.writer:
    log.print(f'tensorboard:   tensorboard --logdir {log.tb_dir.resolve()}')
  return {**last, 'first_val_loss': first_val, 'val_loss': final_val}


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  show = '--show' in argv
  try:
    cfg = config_lib.parse_args([a for a in argv if a != '--show'])
    if show:
      print(cfg)
      return
    train(cfg)
  except ConfigError as e:
    print(f'shardlm: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
