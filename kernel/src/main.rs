//! capvisor: the microkernel (ring 0, VMX root), entered from GRUB through multiboot2.
#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod apic;
mod boot;
mod bootinfo;
mod cpu;
mod entry;
mod ept_space;
mod fpu;
mod hw;
mod ioapic;
mod memory;
mod paging;
mod percpu;
mod phys;
mod roottask;
mod scenario;
mod sched;
mod serial;
mod smp;
mod syscall;
mod vm;
mod vmx;

use core::sync::atomic::Ordering;

/// The boot information, kept for the life of the kernel.
static BOOT_INFO: spin::Once<bootinfo::BootInfo> = spin::Once::new();

/// The BSP's first Rust code (from `boot::long_mode_entry`).
#[unsafe(no_mangle)]
extern "C" fn kernel_main(magic: u32, info_addr: u32) -> ! {
    serial::init();
    println!("capvisor {} booting", env!("CARGO_PKG_VERSION"));
    let info = match bootinfo::parse(magic, u64::from(info_addr)) {
        Ok(i) => BOOT_INFO.call_once(|| i),
        Err(e) => scenario::fail(format_args!("boot information: {e}")),
    };
    scenario::set_name(info.arg("scenario").unwrap_or("boot"));
    let level = match info.arg("log") {
        Some("error") => log::LevelFilter::Error,
        Some("warn") => log::LevelFilter::Warn,
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        Some("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Info,
    };
    serial::init_log(level);
    log::debug!("command line: {}", info.cmdline.as_str());
    for m in info.modules() {
        log::debug!(
            "module {:#x}..{:#x}: {}",
            m.start,
            m.end,
            m.cmdline.as_str()
        );
    }
    if info.dropped > 0 {
        log::warn!(
            "{} memory regions or modules did not fit the boot tables",
            info.dropped
        );
    }

    if let Err(e) = memory::init(info) {
        scenario::fail(format_args!("memory: {e}"));
    }
    let (total, _) = memory::frame_stats();
    println!(
        "memory: {} MiB free in frames, {} modules",
        (total * memory::PAGE_SIZE) >> 20,
        info.module_count
    );
    let unmapped = memory::UNMAPPED_BYTES.load(Ordering::Relaxed);
    if unmapped > 0 {
        log::warn!("memory: {} MiB above 4 GiB left unused", unmapped >> 20);
    }

    percpu::install(0, 0);
    percpu::CPUS[0]
        .kernel_stack_top
        .store(boot::kernel_stack_top(), Ordering::Relaxed);
    cpu::init_this_cpu();
    enable_nx();
    fpu::init_this_cpu();
    entry::init_this_cpu();
    apic::disable_legacy_pic();
    apic::init_this_cpu(true);
    percpu::CPUS[0].apic_id.store(apic::id(), Ordering::Relaxed);
    let state = vmx::init_this_cpu();
    if state == percpu::VmxState::Absent {
        println!("vmx: not available on this CPU (CPUID.1:ECX.VMX = 0); carrying on without it");
    } else {
        vmx::log_features();
    }

    let expected = match acpi::madt(info.rsdt, info.xsdt) {
        Ok(madt) => {
            let t = boot::TRAMPOLINE_BASE;
            let conflict = info.info_range.start < t + 4096 && t < info.info_range.end
                || info.modules().any(|m| m.start < t + 4096 && t < m.end);
            ioapic::init(&madt);
            let started = smp::start_aps(&madt, conflict);
            log::debug!("smp: {started} application processors started");
            madt.count.min(percpu::MAX_CPUS)
        }
        Err(e) => {
            log::warn!("acpi: no MADT ({e}); running on the BSP alone");
            1
        }
    };
    apic::start_timer(smp::TIMER_COUNT);
    percpu::CPUS[0].online.store(true, Ordering::Release);
    hw::enable_interrupts();
    scenario::run(expected, info)
}

/// Sets EFER.NXE where the CPU has it (CPUID.80000001H:EDX[20]).
fn enable_nx() {
    let (max, ..) = hw::cpuid(0x8000_0000, 0);
    if max >= 0x8000_0001 && hw::cpuid(0x8000_0001, 0).3 & (1 << 20) != 0 {
        let efer = hw::rdmsr(hw::msr::IA32_EFER);
        // SAFETY: sets only EFER.NXE, which the CPU reports; no existing mapping uses XD yet.
        unsafe { hw::wrmsr(hw::msr::IA32_EFER, efer | (1 << 11)) };
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    scenario::fail_unlocked(format_args!("kernel panic: {info}"))
}
