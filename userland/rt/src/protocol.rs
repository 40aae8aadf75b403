//! The echo server's protocol: the labels `roottask` sends and `echo` answers.
//!
//! | label | request | reply |
//! |---|---|---|
//! | [`ECHO`] | words w0..w3 | label `ECHO`, words w0+1..w3+1 |
//! | [`SUM_UTCB`] | n extra words in the UTCB | words [sum, n, 0, 0]; n extra words, each + 1 |
//! | [`MAP_AND_SUM`] | a memory capability (one page) | words [sum of its 512 words, vaddr, slot, 1], or [0, 0, 0, 0] without a capability, or label [`ERROR`] |
//! | [`READ_AGAIN`] | — | words [vaddr, 0, 0, 0] *first*, then the server reads the page again (and faults if it was revoked); the sum goes to [`LAST_SUM`] |
//! | [`LAST_SUM`] | — | words [sum from the last `READ_AGAIN`, 0, 0, 0] |
//! | [`BENCH`] | words | the same words, at once (the benchmark's path) |
//! | [`SSE`] | words [pattern, 0, 0, 0] | loads its own SSE pattern, answers words [1 if its pattern held across the call, 0, 0, 0] |
//! | [`IO_PROBE`] | words [port, 0, 0, 0] | words [port, 0, 0, 0] *first*, then the server reads the port (a #GP without a grant); the value goes to [`LAST_SUM`] |
//!
//! Any other label is answered with label [`ERROR`] and words [label, status, 0, 0].

pub const ECHO: u16 = 1;
pub const SUM_UTCB: u16 = 2;
pub const MAP_AND_SUM: u16 = 3;
pub const READ_AGAIN: u16 = 4;
pub const LAST_SUM: u16 = 5;
pub const BENCH: u16 = 6;
pub const IO_PROBE: u16 = 7;
pub const SSE: u16 = 8;
pub const ERROR: u16 = 0xff00;

/// Where the echo server wants a transferred capability to land (its `Utcb::receive_slot`).
pub const ECHO_RECEIVE_SLOT: u64 = crate::layout::CHILD_FIRST_FREE;
