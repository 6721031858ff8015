"""The packer: windows of seq_len + 1 tokens over a source's documents, separated by EOS.

A source's documents (in their seeded order) form one endless token stream, each document
followed by EOS; window k is tokens [k * seq_len, k * seq_len + seq_len + 1) of it, so
consecutive windows overlap by one token and every token is a label exactly once. Inputs are the
first seq_len tokens, labels the last seq_len. Document boundaries are kept as position ids that
restart at 0 after every EOS, which is what a packed-sequence attention (flash-attention's
varlen path, or a block-diagonal mask) needs to keep documents from attending to each other.
The label of an EOS input is the next document's first token; it is kept (as in Megatron without
eod_mask_loss) so that no token of the corpus goes untrained.
"""

from __future__ import annotations

import numpy as np


def position_ids(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """Position of each input token inside its document; 0 at the window start and after each EOS.

    Works on one window (shape [L]) or a batch of them ([B, L]).
    """
    starts = np.zeros(inputs.shape, dtype=bool)
    starts[..., 0] = True
    starts[..., 1:] = inputs[..., :-1] == eos_id
    idx = np.broadcast_to(np.arange(inputs.shape[-1]), inputs.shape)
    return idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)


def cu_seqlens(positions: np.ndarray) -> np.ndarray:
    """Cumulative document lengths in a window (flash-attention's varlen boundaries) from position ids."""
    starts = np.flatnonzero(positions == 0)
    return np.append(starts, len(positions)).astype(np.int32)


def pack(windows: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, labels, position_ids) of one window of seq_len + 1 tokens, or of a batch [B, L + 1]."""
    windows = windows.astype(np.int64)
    inputs, labels = windows[..., :-1], windows[..., 1:]
    return inputs, labels, position_ids(inputs, eos_id)
