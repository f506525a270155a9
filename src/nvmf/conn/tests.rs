//! Unit tests of the request state machine of `nvmf::conn` (kept beside it, in their own file).

use super::*;
use ReqState::*;

const ALL: [ReqState; N_STATES] = [
    Free,
    RecvCapsuleData,
    R2tQueued,
    RecvH2cData,
    ReadyToExecute,
    Executing,
    AwaitingEvent,
    TxC2hData,
    TxResp,
];

#[test]
fn state_indices_are_dense() {
    for (i, s) in ALL.iter().enumerate() {
        assert_eq!(s.index(), i);
    }
}

#[test]
fn transition_table() {
    // Every live state can be released (connection teardown); Free cannot be freed again.
    for s in ALL {
        assert_eq!(s.may_move_to(Free), s != Free, "{s:?} -> Free");
    }
    // The write path through R2T, the read path, and an AER.
    let write = [
        Free,
        RecvCapsuleData,
        R2tQueued,
        RecvH2cData,
        ReadyToExecute,
        Executing,
        TxResp,
        Free,
    ];
    let read = [
        Free,
        RecvCapsuleData,
        ReadyToExecute,
        Executing,
        TxC2hData,
        TxResp,
        Free,
    ];
    let aer = [Free, RecvCapsuleData, AwaitingEvent, TxResp, Free];
    for path in [&write[..], &read[..], &aer[..]] {
        for w in path.windows(2) {
            assert!(w[0].may_move_to(w[1]), "{:?} -> {:?}", w[0], w[1]);
        }
    }
    // Moves that would mean a bug.
    for (a, b) in [
        (R2tQueued, Executing),
        (RecvH2cData, R2tQueued),
        (TxResp, TxC2hData),
        (TxResp, Executing),
        (AwaitingEvent, Executing),
        (Executing, RecvH2cData),
        (TxC2hData, Executing),
    ] {
        assert!(!a.may_move_to(b), "{a:?} -> {b:?} must be refused");
    }
}
