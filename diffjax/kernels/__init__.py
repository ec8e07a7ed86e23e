"""Attention kernels: FlashAttention in Pallas (GPU / Triton, TPU / Mosaic, interpret mode on CPU),
an XLA / cuDNN path, and the plain-JAX reference they are all tested against."""

from diffjax.kernels.attention import IMPLEMENTATIONS, PALLAS_IMPLEMENTATIONS, flash_attention, pallas_flash_attention
from diffjax.kernels.pallas_gpu import GpuBlockSizes
from diffjax.kernels.pallas_tpu import TpuBlockSizes
from diffjax.kernels.reference import reference_attention, reference_attention_with_lse

__all__ = [
    "IMPLEMENTATIONS",
    "PALLAS_IMPLEMENTATIONS",
    "GpuBlockSizes",
    "TpuBlockSizes",
    "flash_attention",
    "pallas_flash_attention",
    "reference_attention",
    "reference_attention_with_lse",
]
