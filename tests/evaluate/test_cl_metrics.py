"""Continual-learning metrics against a matrix computed by hand, for accuracy and for loss."""

from __future__ import annotations

import pytest

from pipeline.evaluate.metrics import cl_metrics

# Domains: A (stage 0), B (stage 1), C (stage 2), E (an eval-only set, in no stage).
STAGE_OF = [0, 1, 2, None]
INITIAL = [0.1, 0.2, 0.3, 0.5]
ACC = [
    [0.6, 0.3, 0.3, 0.6],   # after stage 0
    [0.4, 0.7, 0.35, 0.55],  # after stage 1
    [0.5, 0.6, 0.8, 0.5],   # after stage 2
]
# By hand:
#   AA  = [.6, (.4+.7)/2, (.5+.6+.8)/3]          AIA = running mean of AA
#   FGT after 1: A: .6-.4 = .2;  after 2: A: max(.6,.4)-.5 = .1, B: .7-.6 = .1  -> .1
#   BWT after 1: A: .4-.6 = -.2; after 2: A: .5-.6, B: .6-.7                    -> -.1
#   FWD after 1: B: a[0][B]-init = .3-.2 = .1;  after 2: (.1 + (.35-.3)) / 2    -> .075
AA = [0.6, 0.55, 1.9 / 3]
AIA = [0.6, 0.575, (0.6 + 0.55 + 1.9 / 3) / 3]


def approx(values):
    return [None if v is None else pytest.approx(v, abs=1e-12) for v in values]


def test_accuracy_metrics_match_the_hand_computed_matrix():
    m = cl_metrics(ACC, STAGE_OF, higher_is_better=True, initial=INITIAL)
    assert m["AA"] == approx(AA)
    assert m["AIA"] == approx(AIA)
    assert m["FGT"] == approx([None, 0.2, 0.1])
    assert m["BWT"] == approx([None, -0.2, -0.1])
    assert m["FWD"] == approx([None, 0.1, 0.075])


def test_loss_metrics_use_the_higher_is_better_sign_convention():
    """For a loss, FGT is the rise over the best loss since the domain's stage (positive = forgot),
    BWT and FWD are positive when the loss fell; AA/AIA stay mean losses."""
    loss = [[1 - v for v in row] for row in ACC]  # same changes, opposite direction
    m = cl_metrics(loss, STAGE_OF, higher_is_better=False, initial=[1 - v for v in INITIAL])
    assert m["AA"] == approx([1 - v for v in AA])
    assert m["AIA"] == approx([1 - v for v in AIA])
    # A's loss went .4 -> .6 -> .5: a rise of .2 over its best after stage 1, .1 after stage 2.
    assert m["FGT"] == approx([None, 0.2, 0.1])
    assert m["BWT"] == approx([None, -0.2, -0.1])
    assert m["FWD"] == approx([None, 0.1, 0.075])
    # An improving domain gives a negative FGT (no forgetting) and a positive BWT.
    improving = cl_metrics([[2.0], [1.5]], [0], higher_is_better=False, initial=[3.0])
    assert improving["FGT"] == approx([None, -0.5]) and improving["BWT"] == approx([None, 0.5])


def test_fwd_uses_a_from_scratch_reference_when_given_and_eval_sets_enter_no_metric():
    m = cl_metrics(ACC, STAGE_OF, True, initial=INITIAL, reference=[None, 0.25, 0.4, None])
    assert m["FWD"] == approx([None, 0.05, (0.05 + -0.05) / 2])
    # Changing only the eval-only column changes nothing.
    other = [row[:3] + [0.0] for row in ACC]
    assert cl_metrics(other, STAGE_OF, True, initial=INITIAL) == cl_metrics(ACC, STAGE_OF, True, initial=INITIAL)


def test_missing_values_are_skipped_and_an_empty_average_is_none():
    m = cl_metrics([[None, 0.2]], [0, 1], True, initial=[0.1, 0.1])
    assert m == {"AA": [None], "AIA": [None], "FGT": [None], "BWT": [None], "FWD": [None]}


def test_pretraining_domains_are_old_from_stage_0_and_measured_from_the_initial_model():
    # P: the pretraining corpus (s = -1), A: stage 0. Accuracy of P: .8 initially, .6 after 0, .7 after 1.
    m = cl_metrics([[0.6, 0.5], [0.7, 0.4]], [-1, 0], True, initial=[0.8, 0.1])
    assert m["FGT"] == approx([0.2, (0.1 + 0.1) / 2])  # P below its initial best; A below its stage-0 value
    assert m["BWT"] == approx([-0.2, (-0.1 + -0.1) / 2])
    assert m["AA"] == approx([0.55, 0.55]) and m["FWD"] == [None, None]
