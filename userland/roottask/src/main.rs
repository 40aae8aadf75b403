//! The root task: started by the kernel, it runs the scenario named on the kernel command line.
//!
//! - [`memory`]: the slot allocator and the page allocator over the boot memory capabilities;
//! - [`spawn`]: loading a boot module (ELF) into a new protection domain and starting it;
//! - [`ipc`], [`malformed`]: the `ipc` scenario and its table of malformed system calls;
//! - [`bench`]: the `ipc-bench` scenario;
//! - [`guest`]: the `guest` and `vmexit-bench` scenarios (the VMM runs a 64-bit guest);
//! - [`nested`]: the `nested` and `nested-bench` scenarios (the VMM runs an L1 hypervisor
//!   whose memory an L0 pager owns).
#![no_std]
#![no_main]
#![deny(unsafe_code)]

extern crate alloc;

mod bench;
mod guest;
mod ipc;
mod malformed;
mod memory;
mod nested;
mod spawn;

use abi::Status;
use alloc::format;
use alloc::string::String;
use core::fmt::Display;

rt::entry!(main, rt::Role::Root);

/// A failed check or step: the reason printed on the FAIL line.
pub type Outcome<T> = Result<T, String>;

/// Names the step a status or loader error came from.
pub trait Context<T> {
    fn context(self, what: &str) -> Outcome<T>;
}

impl<T, E: core::fmt::Debug> Context<T> for Result<T, E> {
    fn context(self, what: &str) -> Outcome<T> {
        self.map_err(|e| format!("{what}: {e:?}"))
    }
}

/// Fails the current check with a formatted reason unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($reason:tt)*) => {
        if !$cond {
            return Err(alloc::format!($($reason)*));
        }
    };
}

/// The status a call returned (`Ok` for success), for comparisons with an expected status.
pub fn status_of<T>(r: Result<T, Status>) -> Status {
    r.map_or_else(|e| e, |_| Status::Ok)
}

fn main() {
    let Some(boot) = rt::boot_info() else {
        verdict(
            "?",
            Err("no valid boot information at ROOT_BOOT_INFO".into()),
        );
    };
    let scenario = boot.scenario();
    log::info!(
        "scenario {scenario}, {} CPUs, {} memory blocks, {} modules",
        boot.cpus,
        boot.memory().len(),
        boot.modules().len()
    );
    let outcome = memory::Memory::new(boot).and_then(|mut mem| match scenario {
        "ipc" => ipc::run(&mut mem),
        "ipc-bench" => bench::run(&mut mem),
        "guest" | "vmexit-bench" => guest::run(&mut mem, scenario),
        "nested" | "nested-bench" => nested::run(&mut mem, scenario),
        other => Err(format!("the root task has no scenario '{other}'")),
    });
    verdict(scenario, outcome)
}

/// Prints the verdict line and ends the run.
fn verdict(scenario: &str, outcome: Outcome<()>) -> ! {
    match outcome {
        Ok(()) => {
            rt::println!("capvisor: scenario {scenario}: PASS");
            rt::exit(0)
        }
        Err(reason) => {
            rt::println!("capvisor: scenario {scenario}: FAIL: {}", Shown(&reason));
            rt::exit(1)
        }
    }
}

/// A reason on one line (the runner reads the verdict line by line).
struct Shown<'a>(&'a str);

impl Display for Shown<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for c in self.0.chars() {
            let c = if c == '\n' { ' ' } else { c };
            core::fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}
