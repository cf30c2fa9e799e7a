"""Attention kernels behind one function: dense (XLA, or cuDNN flash on NVIDIA GPUs)."""
import jax


def attend(q_btnh, k_btnh, v_btnh, *, kind='dense', causal=True):
  """Scaled dot-product attention over [B, T, N, H] queries, keys and values."""
  if kind != 'dense':
    raise ValueError(f"attention kind '{kind}' is not available; use 'dense'")
  return jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh, is_causal=causal)
