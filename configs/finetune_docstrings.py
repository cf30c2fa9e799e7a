"""finetune_docstrings: the default run's model fine-tuned to summarize a function in one line.

Command:   python -m shardlm.train                                   # the default run, first
           python -m shardlm.data.demos docstrings --out demo/docstrings
           python -m shardlm.train --config finetune_docstrings
           python -m shardlm.evaluate --checkpoint runs/finetune_docstrings --task generate \
             --data demo/docstrings/test.jsonl --metrics rouge,bleu --stop-at-newline --max-tokens 46
Hardware:  any CPU; a few minutes on 2 cores.
Data:      a standard-library function's first lines of code (`# summary:` after them) -> the
           first line of its docstring; the test functions come from the files the default run
           held out (shardlm/data/demos.py). Loss on the summary only; examples packed per row.
Starts:    from runs/tiny/checkpoints/400 (train.init_from): the default run's parameters, a
           fresh optimizer.
Expect:    validation loss 2.77 -> about 2.06; on the 194 test functions ROUGE-L about 6 (the
           default run's model before: 0.0), below the baseline's 24.8 (the function's name split
           into words); 1200 steps without dropout: 11.5. From the default run continued to
           12,000 steps, 1200 steps: 23.5, 24.3 with --no-repeat-ngram 6, 25.9 (above the
           baseline) adding --temperature 0.7 --mbr 16 (commands and figures: docs/finetuning.md).
"""
from shardlm import config


def get_config():
  c = config.load('tiny')  # the same model: its checkpoint must fit
  c.model.update(kind='gpt_sft', dropout=0.1)
  c.data.update(train_jsonl='demo/docstrings/train.jsonl', valid_jsonl='demo/docstrings/valid.jsonl',
                overlong='truncate', batch_size=16)
  c.optimizer.update(lr=1e-3, min_lr=1e-4, warmup_steps=30, weight_decay=0.1)
  c.train.update(steps=300, eval_every=100, eval_batches=4, init_from='runs/tiny/checkpoints/400')
  c.checkpoint.update(every=300)
  c.log.update(every=20)
  return c
