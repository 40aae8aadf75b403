//! The console: `print!`/`println!` over the `Print` call, and a terse `log` backend.

use crate::sys;
use core::fmt::{self, Write};

/// Collects formatted text and hands it to `Print` in as few calls as it can (each call's text
/// stays together on the console).
struct Console {
    buffer: [u8; 512],
    len: usize,
}

impl Console {
    const fn new() -> Self {
        Self {
            buffer: [0; 512],
            len: 0,
        }
    }

    fn flush(&mut self) {
        if self.len > 0 {
            if let Ok(text) = core::str::from_utf8(&self.buffer[..self.len]) {
                let _ = sys::print(text);
            }
            self.len = 0;
        }
    }
}

impl Write for Console {
    fn write_str(&mut self, mut s: &str) -> fmt::Result {
        while !s.is_empty() {
            let room = self.buffer.len() - self.len;
            if s.len() <= room {
                self.buffer[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
                self.len += s.len();
                break;
            }
            // Split on a character boundary so every `Print` is valid UTF-8.
            let mut cut = room;
            while cut > 0 && !s.is_char_boundary(cut) {
                cut -= 1;
            }
            self.buffer[self.len..self.len + cut].copy_from_slice(&s.as_bytes()[..cut]);
            self.len += cut;
            self.flush();
            s = &s[cut..];
        }
        Ok(())
    }
}

/// Formats `args` and prints them (used by [`print!`](crate::print)).
pub fn print_fmt(args: fmt::Arguments<'_>) {
    let mut console = Console::new();
    let _ = console.write_fmt(args);
    console.flush();
}

/// Prints to the kernel console through the `Print` call.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print_fmt(format_args!($($arg)*)) };
}

/// Prints a line to the kernel console through the `Print` call.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::print_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

/// The `log` backend: `NAME: message` for info, `NAME: LEVEL: message` otherwise.
struct Logger;

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let name = crate::runtime::program_name();
        match record.level() {
            log::Level::Info => print_fmt(format_args!("{name}: {}\n", record.args())),
            level => print_fmt(format_args!("{name}: {level}: {}\n", record.args())),
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the logger (info and above); the runtime does this before `main`.
pub fn init_logger() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}
