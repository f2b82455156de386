import pytest

from reftsearch.metrics import exact_match, final_number, final_number_match, may_still_match


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),  # GSM8K reference
        ("#### 1,200", "1200"),
        ("#### $18.00 in total", "18"),
        ("#### -3.50", "-3.5"),
        ("first 5 then #### 7 and 9", "7"),  # the number right after the mark
        ("a #### 1 b #### 2", "2"),  # the last mark counts
        ("So the answer is 1,200.", "1200"),  # no mark: the last number
        ("It costs 5 dollars. Then 7.", "7"),
        ("no number at all", None),
        ("#### no number after the mark", None),
    ],
)
def test_final_number(text, expected):
    assert final_number(text) == expected


def test_final_number_match_scores_answers_not_reasoning():
    targets = ["2 + 3 = <<2+3=5>>5\n#### 5", "#### 1,000", "#### 7"]
    outputs = ["2 + 3 = 6, so #### 5", "The total is 1000.", "#### 8"]
    assert final_number_match(outputs, targets) == pytest.approx(2 / 3)
    assert exact_match(outputs, targets) == 0.0


def test_a_reference_without_a_number_is_never_matched():
    assert final_number_match(["no answer"], ["no answer"]) == 0.0
    assert exact_match(["no  answer"], ["no answer"]) == 1.0


def test_an_output_may_still_match_while_it_is_a_prefix_up_to_whitespace():
    assert may_still_match("", "positive")
    assert may_still_match("pos", "positive")
    assert may_still_match(" two  ", "two words")
    assert not may_still_match("negative", "positive")
    assert not may_still_match("positive!", "positive")
    # what generation's early stop relies on: an output it gives up on never matches later
    target = "two words"
    for output in ["t", "tw", "two", "two ", "two  w", "twow", "two x", " two\n"]:
        for more in ["", " ", "o", "words", " words", "\nwords ", "x"]:
            if exact_match([output + more], [target]) == 1.0:
                assert may_still_match(output, target), (output, more)
