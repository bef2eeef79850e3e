"""score_trl.logprobs on its own: the trained tokens' log-probs through TRL's fused head equal a plain forward's
log-softmax, padding and unscored positions are 0, and chunking changes nothing."""

from contextlib import nullcontext

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from score_trl.logprobs import per_token_logps, scored_labels


def reference_logps(model, input_ids, attention_mask, length):
    """log p(token | prefix) of the last `length` positions from a plain forward (no fused head)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return logps[:, -length:]


def test_labels_mark_only_scored_unpadded_completion_tokens():
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    scored = torch.tensor([[True, False, True], [True, True, True]])
    assert scored_labels(input_ids, mask, scored).tolist() == [[-100, -100, 7, -100, 9], [-100, -100, 3, 4, -100]]


@pytest.mark.parametrize("chunk_size", [1, 2, 3])
def test_fused_logps_equal_a_plain_forward(tiny_model, chunk_size):
    torch.manual_seed(0)
    tiny_model.eval()
    input_ids = torch.randint(10, 200, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, :2] = 0  # a left-padded prompt
    attention_mask[1, -1] = 0  # a right-padded completion
    scored = torch.tensor([[1, 1, 0, 0, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        expected = reference_logps(tiny_model, input_ids, attention_mask, length=5)
        add_fused_lm_head(tiny_model, outputs=("log_probs", "entropy"))
        logps, entropies, aux = per_token_logps(
            tiny_model, input_ids, attention_mask, scored, chunk_size, nullcontext, compute_entropy=True
        )
    trained = scored & attention_mask[:, -5:].bool()
    torch.testing.assert_close(logps[trained], expected[trained], rtol=1e-5, atol=1e-5)
    assert (logps[~trained] == 0).all() and (entropies[~trained] == 0).all()
    assert (entropies[trained] > 0).all() and aux is None
