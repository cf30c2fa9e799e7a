"""bert_glue: a GLUE sentence-pair task (MNLI: 3 labels) on bert_336m, Megatron-LM's recipe.

Command:   python -m shardlm.train --config bert_glue.py \
             --config.train.init_from=runs/bert_336m/checkpoints/STEP   (or a converted HF BERT)
             --config.data.train_jsonl=mnli/train.jsonl --config.data.valid_jsonl=mnli/dev.jsonl \
             --config.data.tokenizer=bert/tokenizer.json
           python -m shardlm.evaluate --checkpoint runs/bert_glue --task classify --data mnli/dev.jsonl
Data:      JSONL {"text_a": premise, "text_b": hypothesis, "label": "entailment" | "neutral" |
           "contradiction"} (docs/finetuning.md); labels in data.labels's order.
Recipe:    Megatron-LM's MNLI fine-tuning (examples/finetune_mnli_distributed.sh): lr 5e-5,
           5 epochs, warmup over 6.5% of the steps, 8 GPUs x 8 = batch 64, weight decay 0.1,
           dropout 0.1, 512 positions. An epoch of MNLI's 392,702 pairs at batch 64 is 6,136
           steps: train.steps=30,680, warmup_steps=1,994; set both from your data's size
           (steps = 5 x examples / batch).
           RACE (multiple choice): model.kind=bert_choice, lr 1e-5, 3 epochs, batch 32.
Hardware:  one GPU per model copy; nobody here has run it on MNLI (no download on this machine).
"""
from shardlm import config


def get_config():
  c = config.load('bert_336m')
  c.model.update(kind='bert_cls', dropout=0.1, attention_dropout=0.1)  # T stays 512: the checkpoint's
  c.data.update(labels=('entailment', 'neutral', 'contradiction'), batch_size=64, overlong='truncate',
                train_jsonl='mnli/train.jsonl', valid_jsonl='mnli/dev.jsonl')
  c.optimizer.update(lr=5e-5, min_lr=0.0, warmup_steps=1994, decay_steps=30_680, schedule='linear',
                     weight_decay=0.1)
  c.train.update(steps=30_680, eval_every=1000, eval_batches=20)
  c.checkpoint.update(every=6136)
  return c
