"""What a trial trains on the frozen model: ReFT interventions (``reft/``) or LoRA (``lora/``),
behind one interface (``adapter.py``) so one training loop serves both."""
