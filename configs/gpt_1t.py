"""gpt_1t: the 1-trillion-parameter GPT of Narayanan et al. (SC'21, Table 1), 128 layers x 25600 x 160.

Command:   sbatch --nodes=384 scripts/slurm.sbatch --config gpt_1t.py   (one task per GPU)
Hardware:  3072 GPUs (384 nodes of 8 A100 80 GB): the paper's run reached 163 TFLOP/s per GPU,
           52% of peak, with PTD-P.
Layout:    the paper's: tensor parallel 8 inside a node (mesh.model=8) x pipeline 64
           (mesh.stage=64: two layers per stage) x data parallel 6 across pipelines
           (mesh.data=-1). Each pipeline runs its 512 sequences of the global batch of 3072 as
           M=512 micro-batches of one sequence per copy: bubble (P-1)/(RM+P-1) = 63/575 = 11%;
           --config.model.pipeline_repeats=2 (one layer per stage per repeat) gives 63/1087 = 5.8%.
Size:      1.008e12 parameters, the paper's 1008B (tests/test_named_configs.py); per GPU 2.18B
           (1/512 of the layers' matrices, 1/8 of the token table, the 52M-entry position table
           whole): 26.2 GB of float32 parameters and Adam moments, checked by compiling one
           pipeline for 512 simulated devices (tests/test_pipeline.py, seconds).
Status:    DOES NOT FIT an 80 GB GPU yet. XLA's estimate of temporary memory for one step at this
           layout is about 1 TB per device (182 GB with optimizer.grad_accum_steps=8, M=64): the
           backward pass keeps every iteration's stage inputs (GPipe-style, 575 iterations x 2
           layers x T x D), and the embedding, LM head and loss run on the whole batch on every
           stage. Megatron's 1F1B schedule keeps at most P micro-batches in flight; see
           docs/pipeline.md. The optimizer is GPT-3's (lr 6e-5, warmup over 375M tokens, cosine
           to 10% over 260B of 300B tokens); nobody here has run this config.
"""
from shardlm.config import defaults


def get_config():
  c = defaults()
  c.model.update(num_layers=128, hidden=25600, num_heads=160, seq_len=2048, vocab_size=50257,
                 dtype='bfloat16', remat='full', pipeline_microbatches=512, pipeline_repeats=1)
  c.mesh.update(data=-1, stage=64, fsdp=1, model=8)
  c.data.update(batch_size=3072)  # 6.3M tokens per step
  c.optimizer.update(lr=6e-5, min_lr=6e-6, warmup_steps=60, decay_steps=41_300, schedule='cosine',
                     weight_decay=0.1)
  c.train.update(steps=47_700, eval_every=1000, eval_batches=10)
  c.log.update(every=10)
  return c
