"""A bag-of-tokens sequence classifier: the builtin reward model of RecGPT-V2's alignment.

A text `context=query` (the separator a token of the config) is read as two bags of tokens, before and after its first
separator token; the score is an MLP over the two mean embeddings and their product, so
"does the query's token occur in the context" is one product away. Saved and loaded as an
ordinary Hugging Face folder (`AutoModelForSequenceClassification`, model type
`rollfleet_bag_classifier`), the way the reward service loads any reward model.

    from rollfleet.models.bag_classifier import BagClassifierConfig, BagForSequenceClassification
    model = BagForSequenceClassification(BagClassifierConfig(vocab_size=80, separator_id=tok.convert_tokens_to_ids("=")))
    model(input_ids=ids, attention_mask=mask).logits    # [batch, 1]

Why not a tiny Llama: taught the same judgement (is the tag's category in the history?),
tiny Llamas of hidden size 64 and 128 stayed at chance for 400 to 2,500 steps at learning
rates 3e-4 to 3e-3: matching a token against earlier ones by content is a circuit they
did not form in that time. This model learns it in 300 steps.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput


class BagClassifierConfig(PretrainedConfig):
    model_type = "rollfleet_bag_classifier"

    def __init__(
        self,
        vocab_size: int = 64,
        hidden_size: int = 32,
        separator_id: int = 0,
        num_labels: int = 1,
        pad_token_id: int = 0,
        **kw,
    ):
        self.vocab_size, self.hidden_size, self.separator_id = vocab_size, hidden_size, separator_id
        super().__init__(num_labels=num_labels, pad_token_id=pad_token_id, **kw)


class BagForSequenceClassification(PreTrainedModel):
    config_class = BagClassifierConfig

    def __init__(self, config: BagClassifierConfig):
        super().__init__(config)
        h = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, h)
        self.score = nn.Sequential(nn.Linear(3 * h, h), nn.GELU(), nn.Linear(h, config.num_labels))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.1)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        present = attention_mask.bool()
        is_separator = input_ids == self.config.separator_id
        after = is_separator.long().cumsum(-1) > 0
        context = present & ~after
        query = present & after & ~is_separator
        emb = self.embed(input_ids)

        def mean(where):
            w = where.unsqueeze(-1).to(emb.dtype)
            return (emb * w).sum(1) / w.sum(1).clamp(min=1.0)

        c, q = mean(context), mean(query)
        logits = self.score(torch.cat([c, q, c * q], dim=-1))
        loss = None
        if labels is not None:
            loss = nn.functional.binary_cross_entropy_with_logits(
                logits.squeeze(-1), labels.to(logits.dtype)
            )
        return SequenceClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(BagClassifierConfig.model_type, BagClassifierConfig)
AutoModelForSequenceClassification.register(BagClassifierConfig, BagForSequenceClassification)
