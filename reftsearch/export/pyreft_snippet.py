"""The ``reft_config.py`` an export ships: plain pyreft code that rebuilds the exported model.

It runs in an environment with pyreft 0.1.0 and pyvene 0.1.8 and without reftsearch:
``python reft_config.py ["a prompt"]`` loads the base model and the interventions, applies the
float32 fix pyreft 0.1.0's ``load()`` needs, computes the intervened positions the way
reftsearch trained them, and prints them with the logits.
"""

from __future__ import annotations

SNIPPET = '''"""Rebuild reftsearch's export (study {study!r}, trial {trial}) as a pyreft ReftModel.

Needs pyreft==0.1.0 and pyvene==0.1.8 (not reftsearch). Run it from anywhere:

    python reft_config.py ["a prompt"]   # prints the intervened positions and the logits

Or import it: ``model, tokenizer = load_base_model(); reft = load_reft_model(model)``, then
``reft(inputs, unit_locations=unit_locations(prompt_length))``. ``reft_config()`` is the
ReftConfig to train this configuration further with pyreft. Made by reftsearch {version}.
"""
import json
import os
import sys

import pyreft
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
{settings}


def load_base_model():
    """The frozen base model (float32, eval mode) and its tokenizer."""
    local = os.path.join(HERE, BASE_MODEL)
    location = local if os.path.isdir(local) else BASE_MODEL
    model = getattr(transformers, MODEL_CLASS).from_pretrained(location, torch_dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(location)


def reft_config():
    """The pyreft ReftConfig of this export, with fresh float32 interventions."""
    cls = getattr(pyreft, INTERVENTION)
    # NoReFT/DiReFT read add_bias (reftsearch trains them without a bias on the projection)
    extra = {{}} if INTERVENTION == "LoreftIntervention" else {{"add_bias": False}}
    return pyreft.ReftConfig(representations=[
        {{"layer": layer, "component": component, "low_rank_dimension": RANK,
          "intervention": cls(embed_dim=HIDDEN_SIZE, low_rank_dimension=RANK,
                              dropout=DROPOUT, dtype=torch.float32, **extra)}}
        for layer, component in REPRESENTATIONS
    ])


def load_reft_model(model):
    """The trained interventions (and classification head, if any) on ``model``."""
    if PYREFT_LOADABLE:
        reft = pyreft.ReftModel.load(HERE, model, include_model=HEAD_FILE is not None)
    else:
        # pyreft 0.1.0's load() cannot rebuild this intervention type from config.json
        reft = pyreft.get_reft_model(model, reft_config(), set_device=False)
        if HEAD_FILE is not None:
            model.load_state_dict(torch.load(os.path.join(HERE, HEAD_FILE)), strict=False)
    # float32 fix: pyreft 0.1.0's load() builds the interventions' Linear layers in bfloat16,
    # so a float32 model fails ("mat1 and mat2 must have the same dtype"); upcasting alone
    # keeps bfloat16-rounded weights: cast, then load the exact float32 files again.
    for key, intervention in reft.interventions.items():
        intervention.to(torch.float32)
        intervention.load_state_dict(torch.load(os.path.join(HERE, f"intkey_{{key}}.bin")))
        intervention.eval()
    return reft


def intervention_positions(prompt_length):
    """Token positions per intervention (in reft.sorted_keys order) for a prompt of n tokens.

    f<PREFIX>+l<SUFFIX>: the first PREFIX and last SUFFIX prompt tokens (special tokens
    included), each count capped at n // 2. Untied: the first tokens for keys #0, the last for
    keys #1; tied (or only one of f/l): one intervention per layer over both.
    """
    first = list(range(min(PREFIX, prompt_length // 2)))
    last = list(range(prompt_length - min(SUFFIX, prompt_length // 2), prompt_length))
    groups = [first, last] if PREFIX and SUFFIX and not TIED else [first + last]
    return [group for group in groups for _ in LAYERS]


def unit_locations(prompt_length):
    """pyvene's unit_locations for one prompt (batch of 1)."""
    return {{"sources->base": (None, [[p] for p in intervention_positions(prompt_length)])}}


def main():
    model, tokenizer = load_base_model()
    reft = load_reft_model(model)
    if len(sys.argv) > 1:
        ids = tokenizer(sys.argv[1])["input_ids"]
    else:  # the first reference input reftsearch recorded
        with open(os.path.join(HERE, "reference_io.json")) as f:
            ids = json.load(f)["input_ids"]
    with torch.no_grad():
        _, out = reft({{"input_ids": torch.tensor([ids])}}, unit_locations=unit_locations(len(ids)))
    is_classifier = MODEL_CLASS == "AutoModelForSequenceClassification"
    logits = out.logits[0] if is_classifier else out.logits[0, -1]
    print(json.dumps({{"input_ids": ids, "positions": intervention_positions(len(ids)),
                      "logits": logits.float().tolist()[:32], "argmax": int(logits.argmax())}}))


if __name__ == "__main__":
    main()
'''


def render_snippet(sidecar: dict) -> str:
    """``reft_config.py`` for an export described by its ``reftsearch.json`` contents."""
    pyreft = sidecar["pyreft"]
    settings = {
        "BASE_MODEL": sidecar["base_model"]["load_from"],
        "MODEL_CLASS": (
            "AutoModelForSequenceClassification"
            if sidecar["task"] == "classification"
            else "AutoModelForCausalLM"
        ),
        "INTERVENTION": pyreft["intervention_class"].rsplit(".", 1)[1],
        # (layer, pyvene component) per intervention, in sorted_keys order
        "REPRESENTATIONS": [tuple(r[:2]) for r in pyreft["representations"]],
        "LAYERS": sidecar["config"]["layers"],
        "HIDDEN_SIZE": sidecar["base_model"]["hidden_size"],
        "RANK": sidecar["config"]["rank"],
        "DROPOUT": sidecar["dropout"],
        "PREFIX": sidecar["prefix"],
        "SUFFIX": sidecar["suffix"],
        "TIED": sidecar["tied"],
        "PYREFT_LOADABLE": sidecar["pyreft_loadable"],
        "HEAD_FILE": pyreft["head_file"],
    }
    lines = "\n".join(f"{name} = {value!r}" for name, value in settings.items())
    return SNIPPET.format(
        study=sidecar["study"],
        trial=sidecar["trial"],
        version=sidecar["reftsearch_version"],
        settings=lines,
    )
