"""The lifecycle table, checked pair by pair against the states SPEC §1-§6 documents."""

from __future__ import annotations

import itertools

import pytest

from tandem.domain.lifecycle import (
    GUARDS,
    TRANSITIONS,
    AppFacts,
    AppState,
    Operation,
    allowed_operations,
    check_transition,
)
from tandem.errors import InvalidTransition, TransitionRefused

U, M, F, P = (
    AppState.UNMANAGED,
    AppState.MANAGED,
    AppState.FAILED_OVER,
    AppState.FAILBACK_PENDING,
)
O = Operation  # noqa: E741

# Written out independently of the implementation: (state, operation) -> documented state.
DOCUMENTED: dict[tuple[AppState, Operation], AppState] = {
    (U, O.PROTECT): M,  # §1 a template makes the app managed
    (M, O.PROTECT): M,  # applying another template
    (M, O.UNPROTECT): U,
    (M, O.CAPTURE): M,  # §1 captures and mirroring while managed only
    (M, O.REPLICATE): M,
    (M, O.TEST_FAILOVER): M,  # §2 replication continues, state unchanged
    (M, O.FAILOVER): F,  # §3
    (F, O.SYNCBACK): F,  # §4.1/§4.3, repeatable
    (M, O.RESTORE): M,
    (F, O.RESTORE): F,  # §4.4 syncback image restored while still failed over
    (F, O.FAILBACK): M,  # §4.5 state returns to managed
    (F, O.FAILBACK_REPLICA): P,  # §5 step 7: Failover -> Failback
    (P, O.COMMIT_FAILBACK): M,  # §5 commit: protection resumes
    (P, O.UNDO_FAILBACK): F,  # §5 undo: back to the replica
}
for _state in AppState:
    for _op in (O.MOUNT, O.CLONE, O.DELETE_IMAGE):
        DOCUMENTED[(_state, _op)] = _state  # §4.4, §6: image access in any state

ALL_PAIRS = list(itertools.product(AppState, Operation))


def _allowed_text(state: AppState) -> str:
    return ", ".join(sorted(op.value for (s, op) in DOCUMENTED if s is state))


def test_table_is_exactly_the_documented_one() -> None:
    assert dict(TRANSITIONS) == DOCUMENTED


@pytest.mark.parametrize(
    ("state", "operation"), ALL_PAIRS, ids=[f"{s.value}-{o.value}" for s, o in ALL_PAIRS]
)
def test_every_pair(state: AppState, operation: Operation) -> None:
    if (state, operation) in DOCUMENTED:
        assert check_transition("db1", state, operation) is DOCUMENTED[(state, operation)]
        return
    with pytest.raises(InvalidTransition) as info:
        check_transition("db1", state, operation)
    message = str(info.value)
    assert message == (
        f"Application 'db1' is {state.value}; {operation.value} is not allowed in that state. "
        f"Allowed operations now: {_allowed_text(state)}."
    )
    assert info.value.http_status == 409


def test_allowed_operations_are_sorted_and_never_empty() -> None:
    for state in AppState:
        allowed = allowed_operations(state)
        assert allowed == sorted(allowed)
        assert allowed, state
    assert [op.value for op in allowed_operations(U)] == [
        "clone",
        "delete-image",
        "mount",
        "protect",
    ]


def test_values_are_lowercase_with_dashes() -> None:
    assert [s.value for s in AppState] == [
        "unmanaged",
        "managed",
        "failed-over",
        "failback-pending",
    ]
    for op in Operation:
        assert op.value == op.name.lower().replace("_", "-")


GOOD = AppFacts(
    replica_images=1, syncbacks_since_failover=1, has_protective_image=True, mirrored=True
)


@pytest.mark.parametrize(
    ("state", "operation", "fact", "phrase"),
    [
        (M, O.TEST_FAILOVER, {"replica_images": 0}, "no replica image"),
        (M, O.FAILOVER, {"replica_images": 0}, "no replica image"),
        (F, O.FAILBACK_REPLICA, {"replica_images": 0}, "no replica image"),
        (F, O.FAILBACK, {"syncbacks_since_failover": 0}, "tandem syncback APP"),
        (P, O.UNDO_FAILBACK, {"has_protective_image": False}, "protective snapshot"),
        (M, O.REPLICATE, {"mirrored": False}, "--mirror"),
    ],
)
def test_guards_refuse_with_a_reason(
    state: AppState, operation: Operation, fact: dict[str, object], phrase: str
) -> None:
    facts = AppFacts(**{**GOOD.__dict__, **fact})
    with pytest.raises(TransitionRefused) as info:
        check_transition("db1", state, operation, facts)
    assert str(info.value).startswith(f"Cannot {operation.value} application 'db1' now: ")
    assert phrase in str(info.value)
    # The table alone (no facts) does not consult guards; good facts pass.
    assert check_transition("db1", state, operation) is DOCUMENTED[(state, operation)]
    assert check_transition("db1", state, operation, GOOD) is DOCUMENTED[(state, operation)]


def test_default_facts_fail_closed() -> None:
    for operation, guard in GUARDS.items():
        assert guard(AppFacts()) is not None, operation
        assert guard(GOOD) is None, operation


def test_table_checked_before_guards() -> None:
    # An illegal pair is InvalidTransition even when a guard would also refuse.
    with pytest.raises(InvalidTransition):
        check_transition("db1", U, O.FAILOVER, AppFacts())
