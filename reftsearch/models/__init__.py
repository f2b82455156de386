"""The frozen base model every trial sits on: Hugging Face directories, hub ids, GGUF files,
and the built-in models (``tiny:*``, ``embedded:*``)."""
