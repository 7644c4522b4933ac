"""OutputBudget: the node-wide memory connections' pending output may take beyond their base allowance."""

from __future__ import annotations

from fluxmq.broker.stats import OutputBudget

MIB = 1 << 20


def test_allowance_doubles_up_to_an_eighth_of_the_budget_and_is_given_back():
    budget = OutputBudget(64 * MIB)
    allowance = MIB
    for expected in (2, 4, 8):
        allowance = budget.grow(allowance, MIB)
        assert allowance == expected * MIB
    assert budget.grow(allowance, MIB) == 8 * MIB  # an eighth of 64 MiB: one client's share
    assert budget.in_use == 7 * MIB and budget.refusals == 1
    budget.release(allowance - MIB)
    assert budget.in_use == 0 and budget.peak == 7 * MIB


def test_a_full_budget_refuses_and_no_budget_never_grows():
    budget = OutputBudget(16 * MIB)
    assert budget.grow(MIB, MIB) == 2 * MIB  # the per-client share is 2 MiB
    others = [budget.grow(MIB, MIB) for _ in range(20)]
    assert budget.in_use <= 16 * MIB
    assert others.count(MIB) > 0  # refused once the budget is spent
    assert OutputBudget(0).grow(MIB, MIB) == MIB
