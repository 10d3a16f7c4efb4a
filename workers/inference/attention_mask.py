"""The padding mask of an encoder's attention, made by broadcasting, not by gathering.

A batch cut by the token budget holds padding, and for every padded batch transformers'
``sdpa`` path builds a boolean mask of batch x length x length by gathering the 2D
padding mask at each (query, key) index (``masking_utils.sdpa_mask``). What it builds
is only the padding mask repeated along the query axis. On a CPU that gather costs a
third of a 0-layer model's forward at the CPU's token budget and half of a rerank
batch's (``bench/feed.py``); on a GPU it is a kernel per batch, and its
``padding_mask.all()`` check syncs the device once per batch, so the host cannot run
ahead of the model.

:func:`padding_mask` gives the same mask as a broadcast view of the 2D one (no copy, no
gather), and skips the all-kept check on a GPU (where it would sync) by keeping the
mask instead, which gives the same attention. Anything other than the plain
bidirectional padding mask (a causal or sliding mask, packed sequences, an offset) goes
to transformers' own ``sdpa_mask`` unchanged.

:func:`use_broadcast_mask` switches a loaded model's sdpa attention to
:data:`IMPLEMENTATION`, which is transformers' sdpa attention with this mask: the
attention computed is the same, within float rounding (tests check the vectors against
``encode``).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

IMPLEMENTATION = "embed_fleet_sdpa"
"""The attention implementation a worker's models run: sdpa, with :func:`padding_mask`."""

_registered = threading.Lock()


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask ``sdpa_mask`` would make, as a view where it is a plain padding mask
    (see module doc); the same arguments as transformers' mask interface."""
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    plain = (
        mask_function is bidirectional_mask_function
        and not use_vmap
        and local_size is None
        and q_offset == 0
        and kv_offset == 0
        and attention_mask is not None
        and attention_mask.ndim == 2
        and attention_mask.shape[1] == kv_length
    )
    if not plain:
        return sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            local_size=local_size,
            allow_is_causal_skip=allow_is_causal_skip,
            allow_is_bidirectional_skip=allow_is_bidirectional_skip,
            use_vmap=use_vmap,
            device=device,
            **kwargs,
        )
    assert attention_mask is not None  # for mypy: checked in ``plain``
    keep = attention_mask.to(device=device, dtype=torch.bool)
    # No padding: no mask at all, as sdpa_mask decides. On a GPU the question would wait
    # for the device, so the mask is kept there: every key kept, the same attention.
    if allow_is_bidirectional_skip and keep.device.type == "cpu" and bool(keep.all()):
        return None
    return keep[:, None, None, :].expand(batch_size, 1, q_length, kv_length)


def _register() -> None:
    """Make :data:`IMPLEMENTATION` known to transformers (once per process)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    with _registered:
        if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            AttentionInterface.register(IMPLEMENTATION, sdpa_attention_forward)
            AttentionMaskInterface.register(IMPLEMENTATION, padding_mask)


def use_broadcast_mask(model: Any) -> int:
    """Switch every transformers model inside ``model`` (a ``SentenceTransformer``,
    ``SparseEncoder`` or ``CrossEncoder``) that runs sdpa attention to
    :data:`IMPLEMENTATION`; returns how many it switched. A model on another attention
    (eager, flash) keeps it: its masks are its own."""
    from transformers import PreTrainedModel

    switched = 0
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        if getattr(module.config, "_attn_implementation", None) != "sdpa":
            continue
        _register()
        module.set_attn_implementation(IMPLEMENTATION)
        switched += 1
    return switched
