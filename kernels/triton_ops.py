"""The Triton backend: every op of `KernelOps` from its Triton launcher (needs the `triton` package)."""

from quiver.kernels.attention import paged_attention
from quiver.kernels.kv_cache import copy_blocks, store_kv, write_prefix
from quiver.kernels.lora import bottleneck_apply, lora_apply, lora_expand, lora_shrink
from quiver.kernels.ops import KernelOps

TRITON_OPS = KernelOps(
    name="triton",
    store_kv=store_kv,
    paged_attention=paged_attention,
    write_prefix=write_prefix,
    copy_blocks=copy_blocks,
    lora_shrink=lora_shrink,
    lora_expand=lora_expand,
    lora_apply=lora_apply,
    bottleneck_apply=bottleneck_apply,
)
