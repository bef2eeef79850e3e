"""Per-token log-probabilities of the trained tokens only, through TRL's fused LM head.

RLOO scores every completion position. In SCoRe's layout the completion also holds the injected correction turn
(template closing, instruction, generation prompt), which is attended to but never trained, so those positions are
given label -100 here and never go through the LM head. TRL's fused head drops the -100 positions before the
projection on CUDA/XPU only; on other devices it projects every position of the sequence (prompt included) to keep
tile shapes static for compilers such as Neuron's. On CPU that wastes most of the LM head's work, so
`scored_positions_only` extends the compaction to CPU for the duration of a call.
"""

from contextlib import contextmanager

import torch
import trl.trainer.utils as trl_utils


@contextmanager
def scored_positions_only():
    """Let TRL's fused LM head project only the labelled positions on CPU too (it already does on CUDA/XPU)."""
    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def scored_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Labels for the fused head: the token id where the last C positions are `scored` (B, C), -100 elsewhere."""
    labels = torch.full_like(input_ids, -100)
    length = scored.size(1)
    completion = input_ids[:, -length:].masked_fill(~scored.bool() | (attention_mask[:, -length:] == 0), -100)
    labels[:, -length:] = completion
    return labels


def per_token_logps(model, input_ids, attention_mask, scored, chunk_size, autocast, compute_entropy=False,
                    compute_aux_loss=False):  # fmt: skip
    """Log-probs (and entropies) of the `scored` completion tokens, (B, C) each, 0 where not scored.

    `model` must carry TRL's fused LM head (RLOOTrainer adds it). Rows are processed `chunk_size` at a time, which
    bounds the peak memory of no-grad passes independently of the training batch. Returns (logps, entropies or None,
    aux loss or None).
    """
    length = scored.size(1)
    logps, entropies, aux_losses = [], [], []
    with scored_positions_only():
        for start in range(0, input_ids.size(0), chunk_size):
            ids, mask = input_ids[start : start + chunk_size], attention_mask[start : start + chunk_size]
            labels = scored_labels(ids, mask, scored[start : start + chunk_size])
            extra = {"output_router_logits": True} if compute_aux_loss else {}
            with autocast():
                outputs = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, **extra)
            logps.append(outputs.log_probs[:, -length:])
            if compute_entropy:
                entropies.append(outputs.entropy[:, -length:])
            if compute_aux_loss:
                aux_losses.append(outputs.aux_loss)
    return (
        torch.cat(logps),
        torch.cat(entropies) if compute_entropy else None,
        torch.stack(aux_losses).mean() if compute_aux_loss else None,
    )
