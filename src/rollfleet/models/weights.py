"""Model weights as the trainer publishes and checkpoints them, and the rollout engines load them."""

from __future__ import annotations


def export_state(model, state: dict | None = None) -> dict:
    """The model's tensors (or `state`, a full state dict of it), each once and contiguous:
    a tied lm_head is left out (it is the embedding)."""
    state = model.state_dict() if state is None else state
    weights = {k: v.detach().contiguous() for k, v in state.items()}
    if getattr(model.config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)
    return weights
