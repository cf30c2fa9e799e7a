"""bert_glue: a GLUE sentence-pair task (MNLI: 3 labels) on bert_336m, Megatron-LM's recipe.

Command:   python -m shardlm.train --config bert_glue.py \
             --config.train.init_from=runs/bert_336m/checkpoints/STEP   (or a converted HF BERT)
             --config.data.train_jsonl=mnli/train.jsonl --config.data.valid_jsonl=mnli/dev.jsonl \
             --config.data.tokenizer=bert/tokenizer.json
           python -m shardlm.evaluate --checkpoint runs/bert_glue --task classify --data mnli/dev.jsonl
Data:      JSONL {"text_a": premise, "text_b": hypothesis, "label": "entailment" | "neutral" |
           "contradiction"} (docs/finetuning.md); labels in data.labels's order.
Recipe:    Megatron-LM (Shoeybi et al. 2019) fine-tuned BERT on GLUE with lr 5e-5, 5 epochs,
           warmup over 6.5% of the steps, batch 128, dropout 0.1. An epoch of MNLI's 392,702
           pairs at batch 128 is 3,068 steps: train.steps=15,340, warmup_steps=997; set both from
           your data's size (steps = 5 x examples / batch).
           RACE (multiple choice): model.kind=bert_choice, lr 1e-5, 3 epochs, batch 32.
Hardware:  one GPU per model copy; nobody here has run it on MNLI (no download on this machine).
"""
from shardlm import config


def get_config():
  c = config.load('bert_336m')
  c.model.update(kind='bert_cls', dropout=0.1, attention_dropout=0.1)  # T stays 512: the checkpoint's
  c.data.update(labels=('entailment', 'neutral', 'contradiction'), batch_size=128, overlong='truncate',
                train_jsonl='mnli/train.jsonl', valid_jsonl='mnli/dev.jsonl')
  c.optimizer.update(lr=5e-5, min_lr=0.0, warmup_steps=997, decay_steps=15_340, schedule='linear',
                     weight_decay=0.01)
  c.train.update(steps=15_340, eval_every=1000, eval_batches=20)
  c.checkpoint.update(every=3068)
  return c
