"""Check a reftsearch ``--format adapters`` export against the real AdapterHub adapters 1.3.0.

Run with the isolated adapters venv's python (tests/tools/adapters_ref/INSTALL.sh builds it;
see tests/test_export_adapters.py), never with reftsearch's:

    ADAPTERS_PYTHON tests/adapters_check.py EXPORT_DIR [--atol 1e-4] [--generate N]

Loads the exported base model with transformers' own class, ``adapters.init(model)``, then
``model.load_adapter(EXPORT_DIR, set_active=True)`` as a user would; checks that every tensor
of the file found its place (adapters only logs missing or unexpected keys, and an adapter
whose weights did not load still runs, on its random init) and that the loaded units are the
configured kind; then, for every input of reference_io.json, compares adapters' logits with
the adapter active and without it to the ones reftsearch recorded. With ``--generate N`` it
also decodes N greedy tokens per input as the export's note says (``model.generate(...,
use_cache=False)``) and reports the texts, for the caller to compare with reftsearch's. Prints
one JSON summary and exits 0 when everything matches, 1 otherwise.
"""

import argparse
import json
import os
import sys

import adapters
import torch
import transformers


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("export_dir")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--generate", type=int, default=0, metavar="N")
    args = parser.parse_args()

    with open(os.path.join(args.export_dir, "reference_io.json")) as f:
        reference = json.load(f)
    with open(os.path.join(args.export_dir, "adapter_config.json")) as f:
        saved = json.load(f)
    classifier = reference["logits_kind"] == "classification"
    model_class = (
        transformers.AutoModelForSequenceClassification
        if classifier
        else transformers.AutoModelForCausalLM
    )
    model = model_class.from_pretrained(reference["model"], torch_dtype=torch.float32).eval()
    adapters.init(model)
    info = {}
    name = model.load_adapter(args.export_dir, loading_info=info, set_active=True)
    model.eval()

    failures = []
    if info.get("missing_keys") or info.get("unexpected_keys"):
        failures.append(f"load_adapter left weights out: {info}")
    expected = saved["config"]
    units = [
        unit
        for _, layer in model.base_model.iter_layers()
        if name in layer.reft_layer.refts
        for unit in layer.reft_layer.refts[name].units
    ]
    layers = [i for i, layer in model.base_model.iter_layers() if name in layer.reft_layer.refts]
    if layers != expected["layers"]:
        failures.append(f"adapters intervenes on layers {layers}, not {expected['layers']}")
    per_layer = 1 if expected["tied_weights"] else 2
    if len(units) != per_layer * len(layers):
        failures.append(f"{len(units)} units for {len(layers)} layers, expected {per_layer} each")
    for unit in units:  # subtract_projection: what adapters 1.3.0 reloads every ReFT with
        kind = (unit.orthogonal, unit.subtract_projection)
        if kind != (expected["orthogonality"], True):
            failures.append(f"a loaded unit is (orthogonal, subtract_projection) = {kind}")
            break

    worst = worst_base = effect = 0.0
    for example in reference["examples"]:
        ids = torch.tensor([example["input_ids"]])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "token_type_ids" in example:
            inputs["token_type_ids"] = torch.tensor([example["token_type_ids"]])
        with torch.no_grad():
            model.set_active_adapters(name)
            logits = model(**inputs).logits
            model.set_active_adapters(None)
            base_logits = model(**inputs).logits
        n = len(example["logits_head"])
        got, got_base = (
            (x[0] if classifier else x[0, -1])[:n].float() for x in (logits, base_logits)
        )
        want = torch.tensor(example["logits_head"])
        want_base = torch.tensor(example["base_logits_head"])
        worst = max(worst, float((got - want).abs().max()))
        worst_base = max(worst_base, float((got_base - want_base).abs().max()))
        effect = max(effect, float((want - want_base).abs().max()))
    if worst > args.atol:
        failures.append(f"logits differ from reftsearch's by {worst:.3g} (> {args.atol})")
    if worst_base > args.atol:
        failures.append(
            f"logits without the adapter differ by {worst_base:.3g}: base model or head"
        )
    if effect <= args.atol:
        failures.append(f"the adapter changes the logits by only {effect:.3g}: nothing checked")
    generated = []
    if args.generate:
        model.set_active_adapters(name)
        generated = [
            greedy_text(model, reference["model"], e, args.generate) for e in reference["examples"]
        ]
    summary = {
        "ok": not failures,
        "failures": failures,
        "adapter": name,
        "units": len(units),
        "examples": len(reference["examples"]),
        "logits_max_abs_diff": worst,
        "base_logits_max_abs_diff": worst_base,
        "max_abs_effect_of_adapter": effect,
        "generated": generated,
    }
    print(json.dumps(summary))
    sys.exit(0 if summary["ok"] else 1)


def greedy_text(model, tokenizer_dir, example, max_new_tokens):
    """What the export's note says to run: generate without the key/value cache."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, use_cache=False, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    tokens = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


if __name__ == "__main__":
    main()
