"""A Hugging Face model and its tokenizer from a local directory or a hub id, and the error
every failed load becomes."""

from __future__ import annotations

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from reftsearch.models.sources import ModelLoadError


def from_pretrained(
    path: str, location: str, head: str, num_labels: int, dtype: torch.dtype
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    # Hub and file errors come as OSError, bad configs as ValueError/KeyError, missing optional
    # dependencies as ImportError; all of them mean "this path cannot be loaded" to the user.
    try:
        config = AutoConfig.from_pretrained(location)
        if getattr(config, "is_encoder_decoder", False):
            raise ModelLoadError(
                f"{path}: encoder-decoder models ({config.model_type}) are not supported"
            )
        if head == "classification":
            # The head is re-initialised every trial anyway, so a checkpoint trained for a
            # different number of labels is fine.
            model = AutoModelForSequenceClassification.from_pretrained(
                location, num_labels=num_labels, dtype=dtype, ignore_mismatched_sizes=True
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{path}: could not load model: {type(exc).__name__}: {exc}") from exc
    return model, tokenizer
