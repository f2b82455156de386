"""A trial's recorded config (its ``config`` user attribute, a dict) in words and columns.

Read by the commands that only look at a stored study (``best``, ``report``, the progress
lines), so nothing here imports torch, transformers or peft: those take seconds to import.
"""

from __future__ import annotations

from collections.abc import Mapping


def describe_config(config: dict) -> str:
    """A short human line for a resolved config."""
    if not config:
        return "?"
    training = f"lr={config['lr']:.2g} ep{config['epochs']} bs{config['batch_size']}"
    if config.get("method") == "lora":  # reftsearch.methods.lora.module
        targets = ";".join(config["target_modules"])
        return f"lora [{targets}] r{config['rank']} alpha={config['alpha']:g} {training}"
    layers = config["layers"]
    layer_text = ";".join(map(str, layers)) if len(layers) <= 6 else f"{len(layers)} layers"
    tied = " tied" if config.get("tied") else ""
    return (
        f"{config['intervention']} L[{layer_text}] {config['positions']}{tied} "
        f"r{config['rank']} {training}"
    )


def readable_attrs(recorded: Mapping) -> dict:
    """Flat, short attributes (strings and numbers) for the dashboard's trial table."""
    if recorded.get("method") == "lora":
        return {
            "type": "lora",
            "target_modules": ";".join(recorded["target_modules"]),
            "rank": recorded["rank"],
            "alpha": recorded["alpha"],
        }
    return {
        "type": recorded["intervention"],
        "layers": ";".join(map(str, recorded["layers"])),
        "positions": recorded["positions"],
        "tied": recorded["tied"],
        "rank": recorded["rank"],
    }
