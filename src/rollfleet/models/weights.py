"""Model weights as safetensors: what the trainer publishes and the rollout engines load."""

from __future__ import annotations

from safetensors.torch import save


def export_state(model) -> dict:
    """The model's tensors, each once: a tied lm_head is left out (it is the embedding)."""
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)
    return weights


def weights_to_bytes(model) -> bytes:
    return save(export_state(model))
