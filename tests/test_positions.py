import pytest
import torch

from reftsearch.methods.reft.config import describe, num_groups
from reftsearch.methods.reft.positions import intervention_locations, unedited_prefix


def locations(lengths, prefix, suffix, tied, offsets=None):
    offsets = torch.tensor(offsets) if offsets is not None else None
    return intervention_locations(torch.tensor(lengths), prefix, suffix, tied, offsets).tolist()


def test_untied_prefix_and_suffix_make_two_groups():
    assert num_groups(2, 3, tied=False) == 2
    assert locations([10], 2, 3, tied=False) == [[[0, 1, -1]], [[7, 8, 9]]]


def test_tied_makes_one_group_over_all_positions():
    assert num_groups(2, 3, tied=True) == 1
    assert locations([10], 2, 3, tied=True) == [[[0, 1, 7, 8, 9]]]


def test_single_side_is_one_group_whatever_tied_says():
    assert num_groups(0, 2, tied=False) == 1
    assert locations([6], 0, 2, tied=False) == [[[4, 5]]]
    assert locations([6], 3, 0, tied=False) == [[[0, 1, 2]]]


def test_counts_are_capped_at_half_the_prompt_and_padded():
    # n=5: at most 2 first and 2 last tokens, never overlapping (pyreft's rule)
    assert locations([5], 3, 3, tied=True) == [[[0, 1, -1, 3, 4, -1]]]
    assert locations([5], 3, 3, tied=False) == [[[0, 1, -1]], [[3, 4, -1]]]


def test_rows_of_different_lengths_follow_left_padding_offsets():
    # row 0 has 4 prompt tokens behind 3 pads; row 1 has 7 and no pads
    got = locations([4, 7], 1, 1, tied=False, offsets=[3, 0])
    assert got == [[[3], [0]], [[6], [6]]]


def test_describe_uses_pyreft_spelling():
    assert describe(1, 3) == "f1+l3"
    assert describe(0, 2) == "l2"
    assert describe(4, 0) == "f4"


def test_unedited_prefix_is_what_comes_before_the_first_edited_token():
    lengths = torch.tensor([10, 3, 1, 6])
    # suffix only: everything before the last s tokens (capped at n // 2, at least 1 recomputed)
    assert unedited_prefix(lengths, 0, 2).tolist() == [8, 2, 0, 4]
    assert unedited_prefix(lengths, 0, 5).tolist() == [5, 2, 0, 3]
    # any first-token intervention edits token 0; a 1-token prompt gets no f (capped to 0)
    assert unedited_prefix(lengths, 1, 2).tolist() == [0, 0, 0, 0]
    assert unedited_prefix(lengths, 0, 0).tolist() == [9, 2, 0, 5]  # nothing edited


@pytest.mark.parametrize(("prefix", "suffix", "tied"), [(2, 3, False), (2, 3, True), (0, 2, False)])
def test_locations_stay_on_the_batch_device(prefix, suffix, tied):
    """A batch on a GPU gets its locations there: any tensor made on the CPU beside it would
    fail there. The meta device stands in for a GPU (it refuses mixing with the CPU too)."""
    lengths = torch.tensor([5, 9, 3], device="meta")
    offsets = torch.tensor([0, 1, 2], device="meta")
    assert intervention_locations(lengths, prefix, suffix, tied, offsets).device == lengths.device
    assert unedited_prefix(lengths, prefix, suffix).device == lengths.device
