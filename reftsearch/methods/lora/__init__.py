"""LoRA through ``peft``, the baseline ReFT is compared with."""
