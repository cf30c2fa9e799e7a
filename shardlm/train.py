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

from shardlm import config as config_lib, optim, perf, sharding
from shardlm.config import ConfigError
from shardlm.data import loader, tokenizer as tokenizer_lib
from shardlm.model.gpt import GPT, GPTConfig, lm_loss


@dataclasses.dataclass
class Setup:
  """Everything the loop needs, built from the config before any data is read."""
  cfg: object
  mesh: jax.sharding.Mesh
  rules: tuple
  model_config: GPTConfig
  state_shardings: dict
  batch_sharding: jax.sharding.NamedSharding
  init: object        # jitted: () -> state, created directly in its sharded layout
  step: object        # jitted: (state, tokens [B, T+1]) -> (state, metrics); state donated
  eval_loss: object   # jitted: (params, tokens) -> loss
  schedule: object


def setup(cfg, devices=None) -> Setup:
  devices = list(devices if devices is not None else jax.devices())

  # Mesh and rule table: validated against the device count before anything is compiled.
  mesh_shape = config_lib.validate(cfg, len(devices))
  mesh = sharding.make_mesh(mesh_shape, devices)
  rules = sharding.rules_from_config(cfg)
  mc = GPTConfig.from_config(cfg.model, config_lib.padded_vocab(cfg, mesh.shape['model']))

  # Model and optimizer, abstract: shapes and logical names only, no memory.
  tx, schedule = optim.make(cfg.optimizer, cfg.train.steps)
  abstract_model = nnx.eval_shape(lambda: GPT(mc, rngs=nnx.Rngs(0)))
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
  batch_sharding = sharding.named(mesh, rules, ('batch', None))

  # Initialization: jitted with out_shardings, so every array is born in its shard.
  def init():
    params = nnx.to_pure_dict(nnx.state(GPT(mc, rngs=nnx.Rngs(cfg.train.seed)), nnx.Param))
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}

  def loss_fn(params, tokens_bt):
    with sharding.use(mesh, rules):
      logits_btv = nnx.merge(graphdef, params)(tokens_bt[:, :-1])
      return lm_loss(logits_btv, tokens_bt[:, 1:], mc.vocab_size)

  # Step function: a pure (state, batch) -> (state, metrics); metrics stay on device.
  def train_step(state, tokens_bt):
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], tokens_bt)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
                 'opt_state': opt_state}
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': schedule(state['step'])}
    return new_state, metrics

  return Setup(
      cfg=cfg, mesh=mesh, rules=rules, model_config=mc, state_shardings=state_shardings,
      batch_sharding=batch_sharding,
      init=jax.jit(init, out_shardings=state_shardings),
      step=jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval_loss=jax.jit(loss_fn, in_shardings=(param_shardings, batch_sharding),
                        out_shardings=replicated),
      schedule=schedule)


class Logger:
  """Log lines on stdout (process 0), a JSONL metrics file and TensorBoard events."""

  def __init__(self, run_dir: Path, cfg):
    self.enabled = jax.process_index() == 0
    self.metrics_path = run_dir / 'metrics.jsonl'
    self.tb_dir = run_dir / 'tensorboard'
    self.writer = None
    if self.enabled:
      run_dir.mkdir(parents=True, exist_ok=True)
      (run_dir / 'config.json').write_text(cfg.to_json(indent=2))
      self.metrics_path.write_text('')
      if cfg.log.tensorboard:
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(str(self.tb_dir))

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


def train(cfg) -> dict:
  """Runs the whole job; returns the final metrics."""
  s = setup(cfg)
  m, B, T = s.model_config, cfg.data.batch_size, cfg.model.seq_len

  # Data: token streams for train and validation, batches indexed by step. Read before the
  # run directory exists, so that a bad data setting leaves nothing behind.
  tok = tokenizer_lib.get_tokenizer(cfg.data.tokenizer)
  if tok.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f'model.vocab_size={cfg.model.vocab_size} is smaller than tokenizer '
                      f'{tok.name}\'s {tok.vocab_size} ids; set model.vocab_size >= {tok.vocab_size}')
  splits = {split: loader.Batches(loader.load_corpus(cfg.data.corpus, tok, split, cfg.data.val_fraction),
                                  T, B, cfg.data.seed + i)
            for i, split in enumerate(('train', 'validation'))}
  train_data, val_data = splits['train'], splits['validation']

  run_dir = Path(cfg.train.run_dir or f'runs/{cfg.name}')
  log = Logger(run_dir, cfg)
  log.print(f'shardlm: config {cfg.name}; {jax.device_count()} {jax.devices()[0].platform} '
            f'device(s), {jax.process_count()} process(es); {sharding.describe(s.mesh, s.rules)}')
  log.print(f'data: {cfg.data.corpus}, {len(train_data.tokens):,} train / {len(val_data.tokens):,} '
            f'validation tokens; global batch {B} x {T}')

  # Model and optimizer state, created sharded; the step compiled ahead of time.
  t0 = time.perf_counter()
  state = s.init()
  n_params = sum(x.size for x in jax.tree.leaves(state['params']))
  step_fn = s.step.lower(state, train_data.global_batch(0, s.batch_sharding)).compile()
  log.print(f'model: {n_params:,} parameters (vocabulary {m.vocab_size} padded to {m.padded_vocab}); '
            f'compiled in {time.perf_counter() - t0:.1f}s')
  flops_per_step = perf.gpt_flops_per_step(B, T, m.num_layers, m.hidden, m.padded_vocab)
  peak, peak_source = perf.device_peak()
  log.print(f'peak: {peak / 1e9:.1f} GFLOP/s ({peak_source}); {flops_per_step / 1e9:.2f} GFLOP per step')

  def validate(step: int) -> float:
    losses = [s.eval_loss(state['params'], val_data.global_batch(i, s.batch_sharding))
              for i in range(cfg.train.eval_batches)]
    val = float(np.mean(jax.device_get(losses)))
    log.print(f'step {step:>6} | validation loss {val:.4f} | ppl {np.exp(val):.2f}')
    log.write(step, {'val_loss': val})
    return val

  # Loop: metrics are read back only at log intervals, so the host never stalls the device.
  first_val = validate(0)
  total = cfg.train.steps
  pending, t_log, t_start, last = [], time.perf_counter(), time.perf_counter(), {}
  for step in range(total):
    state, metrics = step_fn(state, train_data.global_batch(step, s.batch_sharding))
    pending.append(metrics)
    done = step + 1
    if done % cfg.log.every == 0 or done == total:
      host = jax.device_get(pending)
      now = time.perf_counter()
      dt, n = now - t_log, len(host)
      tokens_s = n * B * T / dt
      flops_s = n * flops_per_step / dt
      last = {'loss': float(np.mean([h['loss'] for h in host])),
              'grad_norm': float(host[-1]['grad_norm']), 'lr': float(host[-1]['lr']),
              'tokens_per_s': tokens_s, 'tflops_per_device': flops_s / jax.device_count() / 1e12,
              'mfu': flops_s / peak, 'step_time_s': dt / n}
      eta = (now - t_start) / done * (total - done)
      bar = '#' * int(20 * done / total)
      log.print(f'step {done:>6}/{total} [{bar:<20}] loss {last["loss"]:.4f} | '
                f'grad norm {last["grad_norm"]:.3f} | lr {last["lr"]:.2e} | {tokens_s:,.0f} tok/s | '
                f'{last["tflops_per_device"] * 1e3:.2f} GFLOP/s/device | MFU {100 * last["mfu"]:.1f}% | '
                f'ETA {_duration(eta)}')
      log.write(done, last)
      pending, t_log = [], now
    if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != total:
      validate(done)
  final_val = validate(total)
  log.close()
  log.print(f'done: {total} steps in {_duration(time.perf_counter() - t_start)}; validation loss '
            f'{first_val:.4f} -> {final_val:.4f} ({100 * final_val / first_val:.0f}% of the first)')
  log.print(f'run directory: {run_dir.resolve()}')
  log.print(f'metrics:       {log.metrics_path.resolve()}')
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
