"""`python -m shardlm.train --config NAME [--config.a.b=value ...]`: train a GPT or BERT on any layout.

The runtime (shardlm.runtime) puts the model on the mesh; this module adds the optimizer, the
train state's shardings and the step, then runs the loop in phases: restore or initialize,
compile, then steps with interval statistics, validation and checkpoints.
"""
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shardlm import (checkpoint, config as config_lib, distributed, errors, grad_accum, optim, perf,
                     runtime, sharding)
from shardlm.data import loader, tokenizer as tokenizer_lib
from shardlm.errors import ConfigError
from shardlm.logger import Logger, duration, summary


@dataclasses.dataclass
class Trainer:
  """The runtime plus what training adds: optimizer, state shardings, jitted init and step."""
  rt: runtime.Runtime
  tx: optax.GradientTransformation
  schedule: object
  state_shardings: dict
  init: object          # jitted: () -> state, created directly in its sharded layout
  init_with: object     # jitted: params -> state with those parameters and a fresh optimizer
  step: object          # jitted: (state, batch) -> (state, metrics); state donated
  eval_metrics: object  # jitted: (params, batch) -> (loss, extra metrics such as BERT's sop_acc)
  grads: object         # jitted: (params, batch) -> (loss, gradients), in micro-batches

  @property
  def batch_sharding(self):
    return self.rt.batch_sharding

  def target(self) -> checkpoint.Target:
    """What a checkpoint of the train state is restored into."""
    abstract = jax.eval_shape(self.init)
    # The optimizer's moments of a layer stack are stacks too, in the same order.
    stacked = jax.tree.map(lambda _: False, abstract)
    stacked.update(params=self.rt.stacked, opt_state=optax.tree_map_params(
        self.tx, lambda _, s: s, abstract['opt_state'], self.rt.stacked,
        transform_non_params=lambda _: False))
    return dataclasses.replace(
        self.rt.target(), abstract=abstract, shardings=self.state_shardings,
        stacked=frozenset(n for n, s in checkpoint.flat_names(stacked).items() if s))


def check_config(cfg, rt: runtime.Runtime) -> None:
  """The training settings (batch, optimizer, loop, checkpoints, data keys) against the mesh."""
  positive = {'data.batch_size': cfg.data.batch_size, 'log.every': cfg.log.every,
              'train.eval_batches': cfg.train.eval_batches, 'train.steps': cfg.train.steps}
  for key, value in positive.items():
    if value <= 0:
      raise ConfigError(f'{key}={value} must be a positive integer')
  if cfg.train.eval_every < 0:
    raise ConfigError(f'train.eval_every={cfg.train.eval_every} must be >= 0 (0: only at the start and end)')
  loader.check_config(cfg.data)
  optim.check_config(cfg.optimizer)
  shape = dict(rt.mesh.shape)
  batch_ways = sharding.split_ways(shape, rt.rules, 'batch')
  over = sharding.split_text(shape, rt.rules, 'batch')
  if cfg.data.batch_size % batch_ways:
    raise ConfigError(f'data.batch_size={cfg.data.batch_size} is not divisible by {over} = {batch_ways}')
  k = cfg.optimizer.grad_accum_steps
  if cfg.data.batch_size % (k * batch_ways):
    raise ConfigError(f'data.batch_size={cfg.data.batch_size} is not divisible by '
                      f'optimizer.grad_accum_steps={k} x {over} = {k * batch_ways}: each '
                      'micro-batch spans every data-parallel device')
  M = rt.model_config.microbatches
  if rt.model_config.stages > 1 and cfg.data.batch_size % (k * M * batch_ways):
    raise ConfigError(f'data.batch_size={cfg.data.batch_size} is not divisible by '
                      f'optimizer.grad_accum_steps={k} x model.pipeline_microbatches={M} x {over} '
                      f'= {k * M * batch_ways}: each pipeline micro-batch spans every '
                      'data-parallel device; lower model.pipeline_microbatches or raise the batch')
  c = cfg.checkpoint
  if c.every < 0 or c.keep_every < 0 or c.keep < 1:
    raise ConfigError(f'checkpoint.every={c.every}, checkpoint.keep={c.keep}, checkpoint.keep_every='
                      f'{c.keep_every}: need every >= 0 (0: only at the end), keep >= 1, keep_every >= 0')
  resume = cfg.train.resume
  if resume not in ('auto', 'none') and not Path(resume).is_dir():
    raise ConfigError(f"train.resume='{resume}' is not a directory; give a checkpoint "
                      "(RUN_DIR/checkpoints/STEP) or a directory of them, 'auto' or 'none'")
  if cfg.train.init_from and not Path(cfg.train.init_from).is_dir():
    raise ConfigError(f"train.init_from='{cfg.train.init_from}' is not a directory; give a "
                      'checkpoint (RUN_DIR/checkpoints/STEP, an export-params or convert output)')
  m = cfg.model
  if m.attention != 'dense' and m.window >= m.seq_len:
    errors.warn(f'model.window={m.window} >= model.seq_len={m.seq_len}: local attention then sees '
                "every earlier position, as model.attention='dense' does, only slower")
  if m.attention == 'local' and m.context_attention == 'ring':
    errors.warn("model.context_attention='ring' has no effect with model.attention='local': local "
                'attention under context parallelism sends a halo of model.window positions')


def setup(cfg, devices=None) -> Trainer:
  """Validates `cfg` and builds the trainer; compiles nothing and allocates nothing."""
  rt = runtime.build(cfg, devices)
  check_config(cfg, rt)
  tx, schedule = optim.make(cfg.optimizer, cfg.train.steps)
  replicated = rt.replicated
  abstract_opt = jax.eval_shape(tx.init, rt.abstract_params)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, rt.param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  state_shardings = {'step': replicated, 'params': rt.param_shardings, 'opt_state': opt_shardings}
  scaled = rt.model_config.dtype == 'float16'  # dynamic loss scaling; bfloat16 keeps float32's range
  if scaled:
    state_shardings['loss_scale'] = {k: replicated for k in ('scale', 'good_steps', 'hysteresis')}

  def init_with(params):
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
    if scaled:
      state['loss_scale'] = optim.loss_scale_init(cfg.optimizer)
    return state

  dropout = rt.model_config.dropout or rt.model_config.attention_dropout

  def grads(params, batch, scale, step=None):
    """Mean loss, metrics and gradients over the batch, in grad_accum_steps micro-batches. With
    dropout and a `step`, micro-batch i draws from (train.seed, step, i): a resumed run draws
    the same masks as an uninterrupted one."""
    def loss_and_grads(p, b, i):
      key = None
      if dropout and step is not None:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.train.seed), step), i)

      def scaled_loss(p):
        loss, extra = rt.objective(p, b, key)
        return loss * scale, (loss, extra)
      (_, out), g = jax.value_and_grad(scaled_loss, has_aux=True)(p)
      return out, g

    def pin(micro):  # each micro-batch keeps the batch's layout: [k, B/k, ...]
      return jax.tree.map(lambda x, names: rt.constrain(x, (None, *names)), micro,
                          rt.kind.batch_axes, is_leaf=lambda x: isinstance(x, tuple))
    (loss, extra), g = grad_accum.value_and_grad(loss_and_grads, params, batch,
                                                 cfg.optimizer.grad_accum_steps, pin, indexed=True)
    return loss, extra, jax.tree.map(lambda x: x / scale, g)

  def train_step(state, batch):
    """A pure (state, batch) -> (state, metrics); metrics stay on device."""
    scale = state['loss_scale']['scale'] if scaled else jnp.float32(1)
    loss, extra, g = grads(state['params'], batch, scale, state['step'])
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

  params_in, batch_in = rt.param_shardings, rt.batch_sharding
  return Trainer(
      rt=rt, tx=tx, schedule=schedule, state_shardings=state_shardings,
      # Initialization is jitted with out_shardings, so every array is born in its shard.
      init=jax.jit(lambda: init_with(rt.new_params(cfg.train.seed)), out_shardings=state_shardings),
      init_with=jax.jit(init_with, in_shardings=(params_in,), out_shardings=state_shardings),
      step=jax.jit(train_step, in_shardings=(state_shardings, batch_in),
                   out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval_metrics=jax.jit(rt.objective, in_shardings=(params_in, batch_in), out_shardings=replicated),
      grads=jax.jit(lambda p, b: (lambda loss, _, g: (loss, g))(*grads(p, b, jnp.float32(1))),
                    in_shardings=(params_in, batch_in), out_shardings=(replicated, params_in)))


# -- phases of a run ----------------------------------------------------------------------------

def make_data(cfg, rt: runtime.Runtime, tok):
  """(loader.Data, train batches, validation batches) for the model kind, checked against the
  model's vocabulary."""
  needed = rt.kind.needed_vocab(tok)
  if needed > cfg.model.vocab_size:
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than tokenizer "
                      f"{tok.name}'s {needed} ids (with the model's special tokens); set "
                      f'model.vocab_size >= {needed}')
  return rt.kind.batches(cfg, tok)


def restore_or_init(cfg, t: Trainer, ckpt: checkpoint.Checkpoints, tok, log: Logger):
  """(state, first step, where it came from): the latest good checkpoint (train.resume=auto) or a
  named one, straight into this mesh's shardings; else train.init_from's parameters with a fresh
  optimizer; else a new state, created sharded."""
  state, start, source = ckpt.restore()
  if state is not None:
    return state, start, source
  if cfg.train.init_from:  # imported or exported weights
    params, path, meta = checkpoint.restore_params(cfg.train.init_from, t.rt.target(), 'train.init_from')
    theirs = meta['tokenizer'].get('fingerprint')
    if meta['tokenizer']['name'] == 'none':  # converted without tokenizer files: trust the config
      log.print(f'note: {path} records no tokenizer; using data.tokenizer={tok.name}')
    elif theirs != getattr(tok, 'fingerprint', tok.name):
      raise ConfigError(f"train.init_from={path} was made with tokenizer {meta['tokenizer']['name']}, "
                        f"this config uses {tok.name}; set data.tokenizer to match")
    fresh = [name for name in t.rt.kind.heads if name not in params]
    if fresh:  # a task head on a base model's checkpoint: the head drawn from train.seed
      # jitted to return the head only: XLA drops the rest of the model it draws.
      drawn = jax.jit(lambda: {n: t.rt.new_params(cfg.train.seed)[n] for n in fresh},
                      out_shardings={n: t.rt.param_shardings[n] for n in fresh})()
      params = {**params, **drawn}
    state = t.init_with(params)
    log.print(f'initialized: parameters from {path}'
              + (f" ({meta['config']['model'].get('kind', 'gpt')}); drawn: {', '.join(fresh)}"
                 if fresh else ''))
    return state, 0, None
  return t.init(), 0, None


def interval_stats(host: list[dict], seconds: float, tokens_per_step: int, flops_per_step: float,
                   peak: float) -> dict:
  """One log interval's record from the steps' metrics (read back from the device at once)."""
  n = len(host)
  kept = [h for h in host if not h.get('skipped', False)] or host  # an overflow's loss is inf
  flops_s = n * flops_per_step / seconds
  record = {'loss': float(np.mean([h['loss'] for h in kept])),
            'grad_norm': float(host[-1]['grad_norm']), 'lr': float(host[-1]['lr']),
            'tokens_per_s': n * tokens_per_step / seconds,
            'tflops_per_device': flops_s / jax.device_count() / 1e12,
            'mfu': flops_s / peak, 'step_time_s': seconds / n}
  # The model's own metrics (BERT: mlm_loss, sop_acc) averaged; float16: the loss scale now and
  # the steps skipped on overflow in this interval.
  record.update({k: float(np.mean([h[k] for h in host])) for k in host[-1]
                 if k not in ('loss', 'grad_norm', 'lr', 'loss_scale', 'skipped')})
  if 'loss_scale' in host[-1]:
    record.update(loss_scale=float(host[-1]['loss_scale']),
                  skipped=int(sum(bool(h['skipped']) for h in host)))
  return record


_CORE = ('loss', 'grad_norm', 'lr', 'tokens_per_s', 'tflops_per_device', 'mfu', 'step_time_s')


def progress_line(done: int, total: int, record: dict, eta_s: float) -> str:
  bar = '#' * int(20 * done / total)
  return (f'step {done:>6}/{total} [{bar:<20}] loss {record["loss"]:.4f} | '
          f'grad norm {record["grad_norm"]:.3f} | lr {record["lr"]:.2e} | '
          f'{record["tokens_per_s"]:,.0f} tok/s | {record["tflops_per_device"] * 1e3:.2f} '
          f'GFLOP/s/device | MFU {100 * record["mfu"]:.1f}%'
          f'{summary({k: v for k, v in record.items() if k not in _CORE})} | ETA {duration(eta_s)}')


def stop_preempted(ckpt, step: int, log: Logger):
  """Preemption: every process saved at the agreed step; wait for the commit, and stop."""
  ckpt.close()
  log.print(f'preempted: SIGTERM; checkpoint at step {step} -> {ckpt.dir / str(step)}; '
            f'exiting with status {distributed.EXIT_PREEMPTED}; run the same command to resume')
  raise distributed.Preempted(step)


def validation(t: Trainer, params, val_data, num_batches: int) -> dict:
  """{'val_loss', 'val_<metric>' ...}: the means over the first num_batches validation batches."""
  results = jax.device_get([t.eval_metrics(params, val_data.global_batch(i, t.batch_sharding))
                            for i in range(num_batches)])
  return {'val_loss': float(np.mean([loss for loss, _ in results])),
          **{f'val_{k}': float(np.mean([e[k] for _, e in results])) for k in results[0][1]}}


def validation_line(step: int, record: dict) -> str:
  extra = {k: v for k, v in record.items() if k != 'val_loss'}
  ppl = '' if extra else f' | ppl {np.exp(record["val_loss"]):.2f}'  # BERT's adds MLM and SOP: no ppl
  return f'step {step:>6} | validation loss {record["val_loss"]:.4f}{ppl}{summary(extra)}'


def train(cfg) -> dict:
  """Runs the whole job; returns the final metrics."""
  t = setup(cfg)
  rt, m, B, T = t.rt, t.rt.model_config, cfg.data.batch_size, cfg.model.seq_len

  # Data: memory-mapped indexed datasets (the built-in corpus is preprocessed into the cache on
  # first use), split by documents, blended; batches indexed by step. Opened and checked before
  # the run directory exists, so that a bad data setting or file leaves nothing behind.
  tok = tokenizer_lib.get_tokenizer(cfg.data.tokenizer)
  data, train_data, val_data = make_data(cfg, rt, tok)

  run_dir = Path(cfg.train.run_dir or f'runs/{cfg.name}')
  log = Logger(run_dir, cfg)
  log.print(f'shardlm: config {cfg.name}; {distributed.describe()}')
  log.print(sharding.describe(rt.mesh, rt.rules, distributed.host_of))
  if m.stages > 1:
    log.print(runtime.pipeline_line(m, B // cfg.optimizer.grad_accum_steps))
  blocks = sharding.split_ways(dict(rt.mesh.shape), rt.rules, 'length')
  if blocks > 1:
    log.print(runtime.context_line(m, blocks))
  log.print(f'data: {data.summary}; global batch {B} x {T}')

  # State, then the step compiled ahead of time. The run directory is written only after the
  # restore, so a bad checkpoint leaves no trace. Whatever happens next, a checkpoint being
  # written is finished before the run ends (ckpt.close()).
  t0 = time.perf_counter()
  ckpt = checkpoint.Checkpoints(cfg, run_dir, tok, t.target())
  try:
    state, start, source = restore_or_init(cfg, t, ckpt, tok, log)
    log.start(start)
    if source:
      log.print(f'resumed: step {start} from {source}'
                + (' (train.steps; raise it to train on)' if start == cfg.train.steps else ''))
    n_params = sum(x.size for x in jax.tree.leaves(state['params']))
    step_fn = t.step.lower(state, train_data.global_batch(start, rt.batch_sharding)).compile()
    log.print(f'model: {n_params:,} parameters (vocabulary {m.vocab_size} padded to '
              f'{m.padded_vocab}); compiled in {time.perf_counter() - t0:.1f}s')
    flops_per_step = perf.gpt_flops_per_step(B, T, m.num_layers, m.hidden, m.padded_vocab)
    peak, peak_source = perf.device_peak()
    log.print(f'peak: {peak / 1e9:.1f} GFLOP/s ({peak_source}); {flops_per_step / 1e9:.2f} GFLOP '
              'per step')

    def validate(step: int) -> float:
      record = validation(t, state['params'], val_data, cfg.train.eval_batches)
      log.print(validation_line(step, record))
      log.write(step, record)
      return record['val_loss']

    # Loop: metrics are read back only at log intervals, so the host never stalls the device.
    # Checkpoints every checkpoint.every steps and at the end, written while training goes on.
    first_val = validate(start)
    total = cfg.train.steps
    pending, t_log, t_start, last = [], time.perf_counter(), time.perf_counter(), {}
    for step in range(start, total):
      state, metrics = step_fn(state, train_data.global_batch(step, rt.batch_sharding))
      pending.append(metrics)
      done = step + 1
      # Steps counted from this run's start: JAX's sync point begins at 1 in every process.
      preempted = distributed.preempted(done - start) and done < total  # at the end: just finish
      if done % cfg.log.every == 0 or done == total or preempted:
        host = jax.device_get(pending)  # waits for the steps: only then is the time right
        now = time.perf_counter()
        last = interval_stats(host, now - t_log, B * T, flops_per_step, peak)
        log.print(progress_line(done, total, last, (now - t_start) / (done - start) * (total - done)))
        log.write(done, last)
        pending, t_log = [], now
      if ckpt.due(done) or preempted:
        saved = ckpt.save(done, state)  # returns once the state is copied off the devices
        if saved:
          log.print(f'checkpoint: step {done} -> {saved}')
      if preempted:
        stop_preempted(ckpt, done, log)
      if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != total:
        validate(done)
    final_val = validate(total) if total > start else first_val
  finally:
    committed = ckpt.close()  # waits for the last checkpoint to commit
    log.close()
  log.print(f'done: {total} steps{f" (resumed at {start})" if start else ""} in '
            f'{duration(time.perf_counter() - t_start)}; validation loss {first_val:.4f} -> '
            f'{final_val:.4f} ({100 * final_val / first_val:.0f}% of the first)')
  log.print(f'run directory: {run_dir.resolve()}')
  log.print(f'metrics:       {log.metrics_path.resolve()}')
  log.print(f'checkpoints:   {ckpt.dir.resolve()} (steps {", ".join(map(str, committed))})')
  if log.writer:
    log.print(f'tensorboard:   tensorboard --logdir {log.tb_dir.resolve()}')
  return {**last, 'first_val_loss': first_val, 'val_loss': final_val}


def main(argv=None):
  errors.run_cli(lambda a: distributed.run(lambda: _main(a)), argv)


def _main(argv):
  argv = list(sys.argv[1:] if argv is None else argv)
  show = '--show' in argv
  cfg = config_lib.parse_args([a for a in argv if a != '--show'])
  if show:
    print(cfg)
    return
  distributed.initialize(cfg, preemptible=True)  # before anything touches a device
  try:
    train(cfg)
  except distributed.Preempted:
    sys.exit(distributed.EXIT_PREEMPTED)


if __name__ == '__main__':
  main()
