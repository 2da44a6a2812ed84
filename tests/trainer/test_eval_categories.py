"""evaluate checks the validation set's category ids AND names against the checkpoint's training
categories (issue 15): the same count with other classes would be scored as the wrong ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import UserError
from trainer.stages.evaluate import check_categories

TRAINED = [[1, "horse"], [2, "star"], [5, "ring"]]
CKPT = Path("runs/x/checkpoints/last.pt")


def test_same_categories_pass():
    check_categories(CKPT, TRAINED, "val.json", [(1, "horse"), (2, "star"), (5, "ring")])


@pytest.mark.parametrize(
    "scored, message",
    [
        (
            [(1, "horse"), (2, "star"), (6, "ring")],
            "class 2 = category 5 'ring' but val.json has 6",
        ),
        (
            [(1, "horse"), (2, "cross"), (5, "ring")],
            "class 1 = category 2 'star' but val.json has 2 'cross'",
        ),
        ([(1, "horse"), (2, "star")], "trained on 3 categories but val.json has 2"),
    ],
)
def test_other_ids_names_or_count_are_refused(scored, message):
    with pytest.raises(UserError, match="last.pt was trained") as e:
        check_categories(CKPT, TRAINED, "val.json", scored)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_older_checkpoint_is_checked_by_count_with_a_note(capsys):
    check_categories(CKPT, None, "val.json", [(1, "horse")])
    assert "records no category names" in capsys.readouterr().err
