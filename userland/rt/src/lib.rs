//! capvisor's user-level runtime: system calls, messages, heap, console, entry point, ELF loading.
//!
//! A program is a `#![no_std]`, `#![no_main]` binary that names its `main` with [`entry!`]:
//!
//! ```text
//! rt::entry!(main, rt::Role::Child);
//! fn main() { rt::println!("hello"); }
//! ```
//!
//! - [`sys`]: one typed wrapper per system call of `docs/abi.md`, and [`Message`];
//! - [`utcb`], [`Mapping`], [`boot_info`]: the memory the runtime reaches by address;
//! - [`elf`]: the program loader's parser; [`layout`]: the agreed addresses and slots;
//! - [`protocol`]: the echo server's labels;
//! - [`nested`]: what the nested VMM and the L0 pager share (`EptRead`/`EptWrite`, `EptMap`
//!   flags in `ept` types, the leaves of an EPT object, the pager's protocol).
//!
//! Only `syscall` (the assembly) and `raw` (memory by address) contain `unsafe`.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

extern crate alloc;

pub mod console;
pub mod elf;
pub mod layout;
pub mod nested;
pub mod protocol;
#[allow(unsafe_code)]
mod raw;
mod runtime;
pub mod sys;
#[allow(unsafe_code)]
mod syscall;
pub use syscall::{inb, outb, set_sse_pattern, sse_pattern_holds};
pub mod vmx;

pub use layout::Role;
pub use raw::{Mapping, PAGE_WORDS, boot_info, module_bytes, role, utcb};
pub use runtime::{exit, program_name, run};
pub use sys::{Message, Selector};
pub use syscall::rdtsc;

/// Names the program's `main` and its [`Role`]: defines the symbol the runtime's `_start`
/// enters after setting up the heap and the logger.
#[macro_export]
macro_rules! entry {
    ($main:path, $role:expr) => {
        #[unsafe(no_mangle)]
        fn __rt_main() -> ! {
            let main: fn() = $main;
            $crate::run($role, env!("CARGO_PKG_NAME"), main)
        }
    };
}
