//! Program start-up and end: heap and logger set-up, `main`, exit, and the panic handler.

use crate::layout::{Role, SELF_THREAD};
use crate::raw;
use crate::sys;

/// Entered from `_start` (in `syscall`) on an aligned stack.
#[cfg(not(test))]
pub(crate) extern "C" fn start() -> ! {
    raw::heap::init();
    crate::console::init_logger();
    crate::syscall::program_main()
}

/// Runs `main` as a program of kind `role` named `name`; called by the code [`crate::entry!`]
/// generates. Ends the program when `main` returns.
pub fn run(role: Role, name: &'static str, main: fn()) -> ! {
    NAME.call_once(|| name);
    raw::set_role(role);
    main();
    exit(0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match raw::boot_info() {
        // The root task speaks for the scenario: its panic is the run's verdict.
        Some(boot) => crate::println!(
            "capvisor: scenario {}: FAIL: {} panicked: {}",
            boot.scenario(),
            program_name(),
            info
        ),
        None => crate::println!("{}: panicked: {}", program_name(), info),
    }
    exit(1)
}

/// Ends the program: `DebugExit(code)` in the root task (which ends the run); elsewhere, where
/// that is refused, the main thread suspends itself, and if even that fails, yields forever.
pub fn exit(code: u64) -> ! {
    let _ = sys::debug_exit(code);
    let _ = sys::thread_suspend(SELF_THREAD);
    loop {
        let _ = sys::yield_now();
    }
}

/// The program's name, as its `entry!` gave it.
pub fn program_name() -> &'static str {
    NAME.get().copied().unwrap_or("?")
}

static NAME: spin::Once<&'static str> = spin::Once::new();
