"""Only valid configs reach training: sampled ones are pruned with a reason, fixed ones refused."""

import re

import optuna
import pytest
from conftest import tiny_study

from reftsearch.cli import main
from reftsearch.errors import SpecError
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.methods.reft.constraints import capped_share, limits_of, why_invalid
from reftsearch.methods.reft.module import ReftModule
from reftsearch.search.study import open_study
from reftsearch.spec.study_file import load_spec, parse_spec

# tiny:llama has 4 layers and hidden size 64; easy_task_files prompts have 20-26 tokens
LIMITS = limits_of(num_layers=4, hidden_size=64, prompt_lengths=[26, 20, 23, 21])


def config(**changes) -> ReftConfig:
    values = dict(intervention="loreft", layers=(0, 1), prefix=1, suffix=1, tied=False, rank=4)
    return ReftConfig(**{**values, **changes})


def test_why_invalid_names_the_rule_that_fails():
    assert why_invalid(config(), LIMITS) is None
    assert "not below the hidden size 64" in why_invalid(config(rank=64), LIMITS)
    assert why_invalid(config(rank=63), LIMITS) is None
    assert "both 0" in why_invalid(config(prefix=0, suffix=0), LIMITS)
    assert "tied needs both" in why_invalid(config(suffix=0, tied=True), LIMITS)
    # the longest prompt (26 tokens) takes 13 positions per side uncapped; 14 fits none
    assert why_invalid(config(prefix=13), LIMITS) is None
    assert "suffix 14 is beyond every training prompt" in why_invalid(config(suffix=14), LIMITS)


def test_positions_are_capped_like_pyreft_and_the_share_is_known():
    assert capped_share(config(prefix=10), LIMITS) == 0  # 2 * 10 <= every prompt
    assert capped_share(config(prefix=11), LIMITS) == 0.5  # 20 // 2 and 21 // 2 < 11
    assert capped_share(config(suffix=12), LIMITS) == 0.75  # 20, 21, 23 < 24


@pytest.mark.parametrize(
    ("prefix", "suffix", "tied", "groups"), [(2, 3, False, 2), (2, 3, True, 1), (0, 3, False, 1)]
)
def test_interventions_are_layers_times_position_groups(prefix, suffix, tied, groups):
    reft_config = config(layers=(0, 2, 3), prefix=prefix, suffix=suffix, tied=tied)
    assert reft_config.num_interventions == 3 * groups
    assert len(ReftModule(reft_config, 64).interventions) == 3 * groups


def test_invalid_sampled_configs_are_pruned_before_training(write_study, easy_task_files):
    raw = tiny_study(easy_task_files, budget={"n_trials": 4, "max_epochs": 1})
    raw["space"].update(rank=[2, 64], prefix=[1, 11, 14], suffix=0)
    study = write_study(raw)
    spec = load_spec(study)
    created = open_study(spec, spec.storage)
    for rank, prefix in ((64, 1), (2, 14), (2, 11), (2, 1)):
        created.enqueue_trial({"rank": rank, "prefix": prefix})
    assert main(["run", str(study)]) == 0
    trials = optuna.load_study(study_name="t", storage=spec.storage).trials
    rank, prefix, capped, plain = trials[:4]
    assert "rank 64 is not below the hidden size 64" in rank.user_attrs["invalid_reason"]
    assert "prefix 14 is beyond every training prompt" in prefix.user_attrs["invalid_reason"]
    for pruned in (rank, prefix):
        assert pruned.state.name == "PRUNED"
        assert "n_params" not in pruned.user_attrs and "epochs_trained" not in pruned.user_attrs
    assert capped.state.name == "COMPLETE" and 0 < capped.user_attrs["positions_capped"] < 1
    assert plain.state.name == "COMPLETE" and "positions_capped" not in plain.user_attrs
    assert plain.user_attrs["n_interventions"] == 4  # all 4 layers x one group
    # the two invalid configs cost no trial of the budget: the sampler's trained 2 more
    trained = [t for t in trials if "invalid_reason" not in t.user_attrs]
    assert len(trained) == 4 and all(t.state.name == "COMPLETE" for t in trained)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rank": 64}, "space.rank: must be below the hidden size 64 of this model, got 64"),
        ({"rank": [64, 128]}, "space.rank: must be below the hidden size 64 .* smallest is 64"),
        ({"prefix": 14}, "space.prefix: must be at most 13: the longest training prompt has 26"),
        ({"suffix": {"low": 20, "high": 30}}, "space.suffix: must be at most 13"),
        ({"layers": ["all", "2;9"]}, r"space.layers\[1\]: layer 9 does not exist"),
    ],
)
def test_a_fixed_value_that_can_never_be_valid_is_exit_2(
    write_study, easy_task_files, capsys, change, message
):
    raw = tiny_study(easy_task_files)
    raw["space"].update(change)
    study = write_study(raw)
    assert main(["run", str(study)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (study.parent / "t.db").exists()  # refused before the storage was touched


def test_tied_needs_both_sides_in_the_spec(tmp_path):
    base = {
        "name": "t",
        "model": "tiny:llama",
        "task": {"kind": "classification", "data": "builtin:sentiment"},
    }
    with pytest.raises(SpecError, match="space.tied: true needs a prefix and a suffix"):
        parse_spec({**base, "space": {"tied": True, "prefix": 2}}, tmp_path)
    parse_spec({**base, "space": {"tied": True, "prefix": 2, "suffix": [0, 2]}}, tmp_path)
