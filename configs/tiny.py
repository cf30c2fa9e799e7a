"""tiny: the default run, a 4-layer byte-level GPT trained on the Python standard library.

Command:   python -m shardlm.train            (same as --config tiny)
Hardware:  any CPU; about 2 minutes on 2 cores, compile included.
Layout:    all devices on the data axis (megatron_fsdp rules, which shard nothing else
           while model and fsdp are 1). Try --config.mesh.model=4 on 8 simulated devices.
Expect:    validation loss from ~5.6 (ln 257) at step 0 to about 2 by the end.
Saves:     runs/tiny/checkpoints/100 and /200; the same command again resumes from the
           last one (and stops: the run is done); add --config.train.steps=400 to go on.
"""
from shardlm.config import defaults


def get_config():
  c = defaults()
  c.model.update(num_layers=4, hidden=128, num_heads=4, seq_len=128, vocab_size=257)
  c.data.update(corpus='stdlib', tokenizer='byte', batch_size=32)
  c.optimizer.update(lr=3e-3, min_lr=3e-4, warmup_steps=30, weight_decay=0.1)
  c.train.update(steps=200, eval_every=50)
  c.checkpoint.update(every=100)  # ~10 MB each, written in the background: 100 and 200
  return c
