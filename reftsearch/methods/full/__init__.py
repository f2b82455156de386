"""Full fine-tuning: every base weight trained, the upper baseline for ReFT and LoRA."""
