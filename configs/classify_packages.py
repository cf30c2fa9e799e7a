"""classify_packages: the default run's model fine-tuned to tell which standard-library package a
120-byte chunk of code comes from (8 packages, balanced; whole files held out for the test).

Command:   python -m shardlm.train                                   # the default run, first
           python -m shardlm.data.demos packages --out demo/packages
           python -m shardlm.train --config classify_packages
           python -m shardlm.evaluate --checkpoint runs/classify_packages --task classify \
             --data demo/packages/test.jsonl
Hardware:  any CPU; a few minutes on 2 cores.
Model:     GPT read at the last token (model.kind=gpt_cls), a fresh 8-way head on the default
           run's parameters (train.init_from).
Expect:    about 4 minutes on 2 cores; validation accuracy 0.2 -> about 0.47; on the 480 test
           chunks accuracy about 44% and macro-F1 about 42, against 12.5% for the majority class.
"""
from shardlm import config
from shardlm.data.demos import PACKAGES


def get_config():
  c = config.load('tiny')  # the same model: its checkpoint must fit
  c.model.update(kind='gpt_cls', dropout=0.1)
  c.data.update(train_jsonl='demo/packages/train.jsonl', valid_jsonl='demo/packages/valid.jsonl',
                labels=PACKAGES, batch_size=32)
  c.optimizer.update(lr=1e-3, min_lr=1e-4, warmup_steps=30, weight_decay=0.1)
  c.train.update(steps=300, eval_every=100, eval_batches=5, init_from='runs/tiny/checkpoints/400')
  c.checkpoint.update(every=300)
  c.log.update(every=20)
  return c
