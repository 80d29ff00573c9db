"""An upstream connection's states and the one table of moves between them."""

from __future__ import annotations

import pytest

from poolbroker.broker.decide.connection import CHECKING, MOVES, POLL, BadMove, State, Wait, check_move

LIVES = [  # every life a connection may lead, as the broker drives it
    [State.CONNECTING, State.IDLE, State.LEASED, State.IDLE, State.CLOSED],  # plain tcp, leased once
    [State.CONNECTING, State.TLS, State.HANDSHAKE, State.IDLE, State.PROBING, State.IDLE, State.LEASED],
    [State.CONNECTING, State.HANDSHAKE, State.IDLE, State.LEASED, State.RESETTING, State.IDLE, State.CLOSED],
    [State.CONNECTING, State.TLS, State.CLOSED],  # a handshake that failed
    [State.CONNECTING, State.IDLE, State.PROBING, State.CLOSED],  # a failed probe
    [State.CONNECTING, State.IDLE, State.LEASED, State.RESETTING, State.CLOSED],  # a reset that failed
]


@pytest.mark.parametrize("life", LIVES)
def test_the_lives_the_broker_leads_are_in_the_table(life: list[State]) -> None:
    state = life[0]
    for new in life[1:]:
        state = check_move(state, new)
    assert state is life[-1]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (State.RESETTING, State.LEASED),  # back to a holder before the reset answered
        (State.PROBING, State.LEASED),  # handed out before the probe's verdict reached the pool
        (State.CONNECTING, State.LEASED),
        (State.CLOSED, State.IDLE),  # a closed connection never comes back
        (State.LEASED, State.PROBING),
        (State.IDLE, State.IDLE),
    ],
)
def test_a_move_the_table_lacks_is_a_bug_raised_at_once(old: State, new: State) -> None:
    with pytest.raises(BadMove, match=f"from {old.value} to {new.value}"):
        check_move(old, new)


def test_every_state_says_what_to_wait_for_and_every_one_can_close() -> None:
    assert set(POLL) == set(MOVES) == set(State)
    assert all(State.CLOSED in MOVES[state] for state in State if state is not State.CLOSED)
    assert POLL[State.CLOSED] is Wait.NOTHING and not MOVES[State.CLOSED]
    assert all(POLL[state] is None for state in CHECKING)  # their check run's send or read decides
