"""Check a reftsearch export against the real pyreft 0.1.0, for what check_export.py cannot do.

Run with the isolated pyreft venv's python (see tests/test_export.py), never with reftsearch's:

    PYREFT_PYTHON tests/pyreft_check.py EXPORT_DIR [--atol 1e-4]

check_export.py (../shared/tools/pyreft_ref) covers LoReFT on causal-LM decoders. This covers
the rest the same way: encoders (pyvene addresses BERT blocks by module path), classification
heads (pyvene's pytorch_model.bin), and NoReFT/DiReFT, which pyreft 0.1.0's load() cannot
rebuild. It loads the export through its own reft_config.py (pyreft.ReftModel.load or
pyreft.get_reft_model, plus the float32 fix), then, for every input of reference_io.json,
compares pyreft's logits with and without the interventions to the ones reftsearch recorded,
and, for a decoder, pyreft's greedy generation (``generate(..., intervene_on_prompt=True)``)
to reftsearch's, token for token. Prints one JSON summary and exits 0 when everything
matches, 1 otherwise.
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys

import torch


def load_snippet(export_dir):
    spec = importlib.util.spec_from_file_location(
        "reft_config", os.path.join(export_dir, "reft_config.py")
    )
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints an nnsight notice on import
        spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("export_dir")
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args()

    snippet = load_snippet(args.export_dir)
    with open(os.path.join(args.export_dir, "reference_io.json")) as f:
        reference = json.load(f)
    failures = []
    model, tokenizer = snippet.load_base_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with contextlib.redirect_stdout(io.StringIO()):
        reft = snippet.load_reft_model(model)
    if list(reft.sorted_keys) != reference["sorted_keys"]:
        failures.append(f"pyreft keys {reft.sorted_keys} != exported {reference['sorted_keys']}")
    for key in reft.sorted_keys:  # the weights pyreft holds are the files' (after the fix)
        saved = torch.load(os.path.join(args.export_dir, f"intkey_{key}.bin"), weights_only=True)
        held = reft.interventions[key].state_dict()
        for name, tensor in saved.items():
            if name not in held or not torch.equal(held[name].float(), tensor):
                failures.append(f"{key}: pyreft does not hold {name} as saved")

    worst = worst_base = 0.0
    effect = 0.0
    generations = []
    classifier = snippet.MODEL_CLASS == "AutoModelForSequenceClassification"
    for i, example in enumerate(reference["examples"]):
        ids = example["input_ids"]
        if snippet.intervention_positions(len(ids)) != example["positions"]:
            failures.append(f"example {i}: reft_config.py positions differ from reftsearch's")
        inputs = {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        }
        if "token_type_ids" in example:
            inputs["token_type_ids"] = torch.tensor([example["token_type_ids"]])
        locations = {"sources->base": (None, [[p] for p in example["positions"]])}
        with torch.no_grad():
            _, out = reft(inputs, unit_locations=locations)
            base_out = model(**inputs)

        n = len(example["logits_head"])
        got, got_base = (
            (logits[0] if classifier else logits[0, -1]).float()[:n]
            for logits in (out.logits, base_out.logits)
        )
        want = torch.tensor(example["logits_head"])
        want_base = torch.tensor(example["base_logits_head"])
        worst = max(worst, float((got - want).abs().max()))
        worst_base = max(worst_base, float((got_base - want_base).abs().max()))
        effect = max(effect, float((want - want_base).abs().max()))
        if "generated_ids" in example:
            expected = example["generated_ids"]
            with torch.no_grad():
                _, generated = reft.generate(
                    inputs, unit_locations=locations, intervene_on_prompt=True,
                    max_new_tokens=len(expected), do_sample=False,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                )  # fmt: skip
            got_ids = generated[0, len(ids) :].tolist()
            generations.append(got_ids == expected)
            if got_ids != expected:
                failures.append(f"example {i}: pyreft generates {got_ids}, reftsearch {expected}")
    if worst > args.atol:
        failures.append(f"logits differ from reftsearch's by {worst:.3g} (> {args.atol})")
    if worst_base > args.atol:
        failures.append(
            f"logits without interventions differ by {worst_base:.3g}: base model or head"
        )
    if effect <= args.atol:
        failures.append(
            f"the interventions change the logits by only {effect:.3g}: nothing checked"
        )
    summary = {
        "ok": not failures,
        "failures": failures,
        "pyreft_loadable": snippet.PYREFT_LOADABLE,
        "intervention": snippet.INTERVENTION,
        "interventions": len(reft.sorted_keys),
        "examples": len(reference["examples"]),
        "logits_max_abs_diff": worst,
        "base_logits_max_abs_diff": worst_base,
        "max_abs_effect_of_interventions": effect,
        "generations": len(generations),
        "generations_matching": sum(generations),
    }
    print(json.dumps(summary))
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
