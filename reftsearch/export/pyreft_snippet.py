"""The ``reft_config.py`` an export ships: plain pyreft code that rebuilds the exported model.

It runs in an environment with pyreft 0.1.0 and pyvene 0.1.8 and without reftsearch:
``python reft_config.py ["a prompt"]`` loads the base model (checking a referenced one's
weight checksums) and the interventions (``torch.load(..., weights_only=True)``), applies the
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
import hashlib
import json
import os
import sys

import pyreft
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
{settings}


def load_base_model():
    """The frozen base model (float32, eval mode) and its tokenizer.

    A copied base model is BASE_MODEL inside this folder; a referenced one is a directory
    (whose weight files must still have the checksums recorded at export) or a hub id at
    BASE_MODEL_REVISION, loaded with the config in BASE_MODEL_CONFIG: the one reftsearch
    trained with, in the fields transformers 4.45 reads.
    """
    local = os.path.join(HERE, BASE_MODEL)
    location = local if os.path.isdir(local) else BASE_MODEL
    if os.path.isdir(location):
        check_weights(location)
    options = {{"torch_dtype": torch.float32, "revision": BASE_MODEL_REVISION}}
    if BASE_MODEL_CONFIG is not None:
        options["config"] = transformers.AutoConfig.from_pretrained(
            os.path.join(HERE, BASE_MODEL_CONFIG)
        )
    if MODEL_CLASS == "AutoModelForSequenceClassification":
        options["ignore_mismatched_sizes"] = True  # the trained head comes from HEAD_FILE
    model = getattr(transformers, MODEL_CLASS).from_pretrained(location, **options)
    tokenizer = getattr(transformers, TOKENIZER_CLASS).from_pretrained(
        location, revision=BASE_MODEL_REVISION
    )
    return model.eval(), tokenizer


def check_weights(directory):
    """Refuse a referenced base model whose weight files changed since the export."""
    for name, expected in (BASE_MODEL_SHA256 or {{}}).items():
        digest = hashlib.sha256()
        with open(os.path.join(directory, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise SystemExit(f"{{directory}}/{{name}}: not the base model this export was "
                             f"trained on (sha256 {{digest.hexdigest()}}, expected {{expected}})")


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
            head = torch.load(os.path.join(HERE, HEAD_FILE), weights_only=True)
            model.load_state_dict(head, strict=False)
    # float32 fix: pyreft 0.1.0's load() builds the interventions' Linear layers in bfloat16,
    # so a float32 model fails ("mat1 and mat2 must have the same dtype"); upcasting alone
    # keeps bfloat16-rounded weights: cast, then load the exact float32 files again.
    for key, intervention in reft.interventions.items():
        intervention.to(torch.float32)
        path = os.path.join(HERE, f"intkey_{{key}}.bin")
        intervention.load_state_dict(torch.load(path, weights_only=True))
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
    base_model = sidecar["base_model"]
    settings = {
        "BASE_MODEL": base_model["load_from"],
        "BASE_MODEL_REVISION": base_model["revision"],
        "BASE_MODEL_SHA256": base_model["sha256"],
        "BASE_MODEL_CONFIG": base_model["config"],
        "TOKENIZER_CLASS": base_model["tokenizer_class"],
        "MODEL_CLASS": (
            "AutoModelForSequenceClassification"
            if sidecar["task"] == "classification"
            else "AutoModelForCausalLM"
        ),
        "INTERVENTION": pyreft["intervention_class"].rsplit(".", 1)[1],
        # (layer, pyvene component) per intervention, in sorted_keys order
        "REPRESENTATIONS": [tuple(r[:2]) for r in pyreft["representations"]],
        "LAYERS": sidecar["config"]["layers"],
        "HIDDEN_SIZE": base_model["hidden_size"],
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
