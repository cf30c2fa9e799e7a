"""shardlm: Megatron-class Transformer language models in JAX, sharded by a rule table."""
__version__ = '0.1.0'
