//! Where things live: the virtual addresses and selectors every program and its creator agree on.
//!
//! Root task and children alike hold their own PD at selector [`SELF_PD`] and their main thread
//! at [`SELF_THREAD`]; the root task gets those from the kernel, a child from `roottask`'s
//! `spawn`, which also fills the rest of the child's initial slots:
//!
//! | child slot | capability | rights |
//! |---:|---|---|
//! | 0 | the child's own PD | all |
//! | 1 | the child's main thread | all |
//! | 2 | the service endpoint a server receives on | RECEIVE |
//! | 3..=15 | reserved for further boot capabilities (empty today) | |
//! | 16.. | free for the child ([`CHILD_FIRST_FREE`]) | |

/// Bytes in a page.
pub const PAGE_SIZE: u64 = 4096;
/// Capability slots per space.
pub const SLOTS: u64 = 4096;

/// Link address of every program (`userland/user.ld`).
pub const IMAGE_BASE: u64 = 0x0000_0100_0000_0000;

/// The scratch window: [`SCRATCH_PAGES`] pages of virtual space every program leaves free for
/// the runtime's temporary mappings (`rt::Mapping`).
pub const SCRATCH_BASE: u64 = 0x0000_0200_0000_0000;
pub const SCRATCH_PAGES: u64 = 64;

/// The caller's own protection domain, in the root task and in every child.
pub const SELF_PD: u64 = 0;
/// The caller's main thread, in the root task and in every child.
pub const SELF_THREAD: u64 = 1;
/// In a child: the endpoint a server receives its calls on (RECEIVE).
pub const CHILD_SERVICE_ENDPOINT: u64 = 2;
/// In a child: the first slot nothing is put in by its creator.
pub const CHILD_FIRST_FREE: u64 = 16;

/// A child's main-thread UTCB.
pub const CHILD_UTCB: u64 = 0x0000_0080_0020_0000;
/// Top of a child's main-thread stack; the stack is [`CHILD_STACK_PAGES`] pages below it.
pub const CHILD_STACK_TOP: u64 = 0x0000_0080_0040_0000;
pub const CHILD_STACK_PAGES: u64 = 16;

/// Which kind of program runs: decides where the main thread's UTCB is and what a panic does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The root task, started by the kernel (`abi::ROOT_*` addresses).
    Root,
    /// A program started by the root task (`CHILD_*` addresses above).
    Child,
}

impl Role {
    /// The main thread's UTCB address.
    pub const fn utcb(self) -> u64 {
        match self {
            Role::Root => abi::ROOT_UTCB,
            Role::Child => CHILD_UTCB,
        }
    }
}
