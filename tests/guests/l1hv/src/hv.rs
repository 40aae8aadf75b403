//! One vCPU's hypervisor: VMX set-up for one L2, the run loop and L2's exit handlers.
//!
//! Exits are read field by field as their reason needs (so that a reflected exit costs L1 as few
//! VMREADs as the SDM allows) into a `vcpu::RawExit`, and decoded by `vcpu::decode`, the
//! project's one exit decoder. Handlers:
//!
//! - CPUID: executed by L1 and passed to L2 (VMX hidden); L1's own leaf answered by L1;
//! - HLT: skipped, and the interrupt L2 waits for injected;
//! - I/O (through L1's I/O bitmap): the serial port (L2's lines forwarded with a prefix), the
//!   end port, benchmark results, revocation (L2 address translated to L1's, forwarded), the
//!   shadow-fault counter (forwarded), and L2's requests on L1's test port;
//! - RDMSR/WRMSR of L1's own MSR (others: #GP into L2);
//! - EPT violations inside a lazy window: map the page (and INVEPT if the window says so);
//! - an EPT misconfiguration at the armed page: repair the entry, INVEPT;
//! - #UD (exception bitmap): reflected into L2; NMIs and external interrupts: counted.

use ept::entry::PageSize;
use vcpu::exit::{EventInfo, EventType, ExitReason, Gpr, IoDirection, RawExit, VmExit, decode};
use vcpu::vmcs::{Interruptibility, VmcsField};

use crate::arch::{self, GuestRegs, HostTables, RunStatus};
use crate::l2_ept::EptTables;
use crate::layout::{self, PAGE, fail, l1, l2, leaf, port, request};
use crate::memory;
use crate::println;
use crate::vmx::{self, CurrentVmcs, RFLAGS_IF, VmFail, VmcsContents, Vmx};

/// Where the L1 pages of a lazy window come from.
#[derive(Debug, Clone, Copy)]
pub enum Backing {
    /// A fresh arena page filled with L1's pattern (version 0) at the fault.
    Fill,
    /// Page i of the window maps `l1_base + i * 4 KiB`, filled before VMLAUNCH.
    Prefilled(u64),
}

/// L2 pages L1 maps only on its EPT-violation exits.
#[derive(Debug, Clone, Copy)]
pub struct LazyWindow {
    pub base: u64,
    pub pages: u64,
    pub backing: Backing,
    /// INVEPT (single-context) after each mapping.
    pub invept: bool,
    /// EPT violations taken in the window.
    pub violations: u64,
}

/// L1's exit counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub exits: u64,
    pub ept_violations: u64,
    pub misconfigurations: u64,
    pub cpuid: u64,
    pub hlt: u64,
    pub injections: u64,
    pub invalid_opcode: u64,
    pub msr: u64,
    pub nmi: u64,
    pub external_interrupts: u64,
    pub remaps: u64,
    pub revocations: u64,
}

/// What L2 reported on L1's test port.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reports {
    pub large_faults: Option<u64>,
    pub migration: Option<u64>,
}

/// What an exit handler asks of the run loop.
enum Flow {
    Resume,
    /// L2 wrote this to the end port.
    End(u32),
}

/// The L2 line being forwarded.
struct Line {
    bytes: [u8; 80],
    len: usize,
}

pub struct Hypervisor {
    pub index: usize,
    pub vmx: Vmx,
    pub vmxon_region: u64,
    pub vmcs: u64,
    pub ept: EptTables,
    pub eptp: u64,
    pub vpid: u16,
    pub regs: GuestRegs,
    pub launched: bool,
    pub windows: [Option<LazyWindow>; 2],
    /// Mode 2: the L2 page behind a misconfigured entry, and that entry's L1 address and
    /// correct value.
    pub misconfigured: Option<(u64, u64, u64)>,
    pub counters: Counters,
    pub reports: Reports,
    /// Benchmark results L2 wrote (forwarded to port 0xf5 as they came).
    pub results: [u32; 8],
    pub result_count: usize,
    pending: Option<EventInfo>,
    l1_msr: u64,
    line: Line,
}

impl Hypervisor {
    /// Enters VMX operation and prepares L2's VMCS (current after this) and an EPT that maps
    /// L1's image one to one (L2 runs its payload from it): VMXON, VMCLEAR, VMPTRLD, the I/O
    /// and MSR bitmaps, INVVPID of L2's VPID, every VMCS field.
    pub fn new(index: usize, count: usize, mode: u64, host: HostTables) -> Result<Self, u32> {
        let vmx = Vmx::discover(index == 0)?;
        let vmxon_region = memory::page()?;
        vmx.enable(vmxon_region)?;
        let setup = |what: &str, e: VmFail| {
            println!("l1hv: {what}: {e}");
            fail::VMX_SETUP
        };
        let vmcs = memory::page()?;
        vmx.stamp(vmcs);
        vmx::check(arch::vmclear(vmcs)).map_err(|e| setup("VMCLEAR", e))?;
        vmx::check(arch::vmptrld(vmcs)).map_err(|e| setup("VMPTRLD", e))?;

        // I/O bitmaps (§25.6.4): A covers ports 0-0x7fff, B 0x8000-0xffff; a set bit exits.
        let io_bitmap_a = memory::page()?;
        let io_bitmap_b = memory::page()?;
        let intercepted = (port::SERIAL..=port::SERIAL_LAST)
            .chain(port::END..=port::SHADOW_FAULTS)
            .chain([port::TEST]);
        for p in intercepted {
            let word = io_bitmap_a + 8 * u64::from(p / 64);
            arch::phys_write(word, arch::phys_read(word) | 1 << (p % 64));
        }
        // MSR bitmap (§25.6.9): read low, read high, write low, write high, 1 KiB each; every
        // MSR exits except IA32_FS_BASE (L2's own, in the VMCS), read and written directly.
        let msr_bitmap = memory::page()?;
        for word in 0..PAGE / 8 {
            arch::phys_write(msr_bitmap + 8 * word, u64::MAX);
        }
        let fs_base = u64::from(layout::IA32_FS_BASE - 0xc000_0000);
        for half in [1024, 3072] {
            let word = msr_bitmap + half + 8 * (fs_base / 64);
            arch::phys_write(word, arch::phys_read(word) & !(1 << (fs_base % 64)));
        }

        let mut ept = EptTables::new()?;
        let (start, end) = arch::image_range();
        for page in (start..end).step_by(PAGE as usize) {
            ept.map(page, page, PageSize::Size4K)?;
        }
        let eptp = ept.pointer();
        if let Err(e) = eptp.check(false, vmx.max_phys_bits) {
            println!("l1hv: EPTP {:#x}: {e:?}", eptp.0);
            return Err(fail::VMX_SETUP);
        }
        let vpid = index as u16 + 1;
        let contents = VmcsContents {
            host,
            l2: arch::l2_tables(index),
            io_bitmap_a,
            io_bitmap_b,
            msr_bitmap,
            eptp: eptp.0,
            vpid,
        };
        for address in [io_bitmap_a, io_bitmap_b, msr_bitmap, eptp.root()] {
            if address & !vmx.max_address() != 0 {
                println!("l1hv: {address:#x} beyond the physical-address width");
                return Err(fail::LAYOUT);
            }
        }
        if let Err((field, e)) = vmx::write_vmcs(&vmx, &contents) {
            println!("l1hv: VMWRITE {field:?}: {e}");
            return Err(fail::VMX_SETUP);
        }
        // A VPID may carry translations from an earlier user: flush it (§31.3 INVVPID).
        use vcpu::controls::EptVpidCapabilities as C;
        if vmx.ept.contains(C::INVVPID | C::INVVPID_SINGLE_CONTEXT) {
            vmx::check(arch::invvpid(vmx::INVVPID_SINGLE_CONTEXT, vpid, 0))
                .map_err(|e| setup("INVVPID", e))?;
        }
        let mut regs = GuestRegs::default();
        regs.gpr[Gpr::Rdi.number()] = index as u64;
        regs.gpr[Gpr::Rsi.number()] = mode;
        regs.gpr[Gpr::Rdx.number()] = count as u64;
        Ok(Hypervisor {
            index,
            vmx,
            vmxon_region,
            vmcs,
            ept,
            eptp: eptp.0,
            vpid,
            regs,
            launched: false,
            windows: [None; 2],
            misconfigured: None,
            counters: Counters::default(),
            reports: Reports::default(),
            results: [0; 8],
            result_count: 0,
            pending: None,
            l1_msr: 0,
            line: Line {
                bytes: [0; 80],
                len: 0,
            },
        })
    }

    /// INVEPT of L2's EPT (single-context where offered, else all-context).
    pub fn invept(&self) -> Result<(), u32> {
        vmx::check(arch::invept(self.vmx.invept_kind, self.eptp)).map_err(|e| {
            println!("l1hv: INVEPT: {e}");
            fail::VMX_SETUP
        })
    }

    /// Leaves VMX operation: VMCLEAR of L2's VMCS, VMXOFF.
    pub fn finish(&self) -> Result<(), u32> {
        vmx::check(arch::vmclear(self.vmcs))
            .and_then(|()| vmx::check(arch::vmxoff()))
            .map_err(|e| {
                println!("l1hv: VMCLEAR/VMXOFF: {e}");
                fail::VMX_SETUP
            })
    }

    /// Runs L2 until it writes the end port: `Ok(value written)`, or the failure that stopped
    /// L1.
    pub fn run(&mut self) -> Result<u32, u32> {
        if !self.launched {
            println!("l1hv: vcpu{}: VMLAUNCH", self.index);
        }
        loop {
            if let Some(event) = self.pending.take() {
                self.inject(event)?;
            }
            match arch::vm_run(&mut self.regs, self.launched) {
                RunStatus::Exited => {}
                RunStatus::Failed(status) | RunStatus::HostRspFailed(status) => {
                    let what = if self.launched {
                        "VMRESUME"
                    } else {
                        "VMLAUNCH"
                    };
                    match vmx::check(status) {
                        Err(e) => println!("l1hv: vcpu{}: {what}: {e}", self.index),
                        Ok(()) => println!("l1hv: vcpu{}: {what}: fell through", self.index),
                    }
                    return Err(fail::VM_ENTRY);
                }
            }
            self.launched = true;
            self.counters.exits += 1;
            match self.exit()? {
                Flow::Resume => {}
                Flow::End(value) => return Ok(value),
            }
        }
    }

    /// Reads the exit-information fields this exit's reason uses (SDM §28.2).
    fn read_exit(&self) -> Result<RawExit, u32> {
        let read = |field| {
            vmx::read(field).map_err(|e| {
                println!("l1hv: VMREAD {field:?}: {e}");
                fail::VM_ENTRY
            })
        };
        let mut raw = RawExit {
            reason: read(VmcsField::EXIT_REASON)? as u32,
            ..RawExit::default()
        };
        let field = raw.reason_field();
        if field.entry_failure {
            raw.qualification = read(VmcsField::EXIT_QUALIFICATION)?;
            return Ok(raw);
        }
        use ExitReason as R;
        match field.reason() {
            Some(R::Cpuid | R::Hlt | R::Rdmsr | R::Wrmsr) => {
                raw.instruction_length = read(VmcsField::VM_EXIT_INSTRUCTION_LENGTH)? as u32;
            }
            Some(R::IoInstruction) => {
                raw.qualification = read(VmcsField::EXIT_QUALIFICATION)?;
                raw.instruction_length = read(VmcsField::VM_EXIT_INSTRUCTION_LENGTH)? as u32;
            }
            Some(R::EptViolation | R::EptMisconfiguration) => {
                if field.reason() == Some(R::EptViolation) {
                    raw.qualification = read(VmcsField::EXIT_QUALIFICATION)?;
                }
                raw.guest_physical_address = read(VmcsField::GUEST_PHYSICAL_ADDRESS)?;
                self.read_vectoring(&mut raw)?;
            }
            Some(R::ExceptionOrNmi | R::ExternalInterrupt) => {
                raw.interruption_information =
                    read(VmcsField::VM_EXIT_INTERRUPTION_INFORMATION)? as u32;
                raw.interruption_error_code =
                    read(VmcsField::VM_EXIT_INTERRUPTION_ERROR_CODE)? as u32;
                raw.qualification = read(VmcsField::EXIT_QUALIFICATION)?;
                self.read_vectoring(&mut raw)?;
            }
            _ => raw = RawExit::read(&CurrentVmcs),
        }
        Ok(raw)
    }

    /// The IDT-vectoring fields: an exit during event delivery must re-inject the event
    /// (SDM §28.2.4; L1 does, [`Hypervisor::exit`]).
    fn read_vectoring(&self, raw: &mut RawExit) -> Result<(), u32> {
        let read = |field| vmx::read(field).map_err(|_| fail::VM_ENTRY);
        raw.idt_vectoring_information = read(VmcsField::IDT_VECTORING_INFORMATION)? as u32;
        if raw.idt_vectoring_information & EventInfo::VALID != 0 {
            raw.idt_vectoring_error_code = read(VmcsField::IDT_VECTORING_ERROR_CODE)? as u32;
            raw.instruction_length = read(VmcsField::VM_EXIT_INSTRUCTION_LENGTH)? as u32;
        }
        Ok(())
    }

    fn gpr(&self, gpr: Gpr) -> u64 {
        self.regs.gpr[gpr.number()]
    }

    fn set_gpr(&mut self, gpr: Gpr, value: u64) {
        self.regs.gpr[gpr.number()] = value;
    }

    /// Past the instruction that exited.
    fn skip(&mut self, raw: &RawExit) -> Result<(), u32> {
        let rip = vmx::read(VmcsField::GUEST_RIP).map_err(|_| fail::VM_ENTRY)?;
        vmx::write(
            VmcsField::GUEST_RIP,
            rip + u64::from(raw.instruction_length),
        )
        .map_err(|_| fail::VM_ENTRY)
    }

    /// Writes the VM-entry event injection fields (SDM §25.8.3, checked by §27.2.1.3). An
    /// external interrupt needs RFLAGS.IF = 1 and no blocking by STI or MOV SS (§27.3.1.5): the
    /// instruction L1 just skipped ended any such blocking, so L1 clears it.
    fn inject(&mut self, event: EventInfo) -> Result<(), u32> {
        let bad = |_| fail::VM_ENTRY;
        if event.kind == EventType::ExternalInterrupt {
            let rflags = vmx::read(VmcsField::GUEST_RFLAGS).map_err(bad)?;
            if rflags & RFLAGS_IF == 0 {
                println!("l1hv: vcpu{}: L2 has interrupts disabled", self.index);
                return Err(fail::INJECTION);
            }
            let state = vmx::read(VmcsField::GUEST_INTERRUPTIBILITY_STATE).map_err(bad)?;
            let shadow = u64::from(
                (Interruptibility::BLOCKING_BY_STI | Interruptibility::BLOCKING_BY_MOV_SS).bits(),
            );
            if state & shadow != 0 {
                vmx::write(VmcsField::GUEST_INTERRUPTIBILITY_STATE, state & !shadow)
                    .map_err(bad)?;
            }
        }
        let (information, error_code) = event.encode();
        if event.error_code.is_some() {
            vmx::write(
                VmcsField::VM_ENTRY_EXCEPTION_ERROR_CODE,
                u64::from(error_code),
            )
            .map_err(bad)?;
        }
        vmx::write(
            VmcsField::VM_ENTRY_INTERRUPTION_INFORMATION,
            u64::from(information),
        )
        .map_err(bad)
    }

    /// Handles one exit.
    fn exit(&mut self) -> Result<Flow, u32> {
        let raw = self.read_exit()?;
        let field = raw.reason_field();
        if field.entry_failure {
            println!(
                "l1hv: vcpu{}: VM entry failed: reason {} qualification {:#x}",
                self.index, field.basic, raw.qualification
            );
            return Err(fail::VM_ENTRY);
        }
        // An event whose delivery the exit interrupted is delivered again (§28.2.4, §27.6).
        if let Some(event) = raw.idt_vectoring() {
            if event.kind.uses_instruction_length() {
                vmx::write(
                    VmcsField::VM_ENTRY_INSTRUCTION_LENGTH,
                    u64::from(raw.instruction_length),
                )
                .map_err(|_| fail::VM_ENTRY)?;
            }
            self.pending = Some(event);
        }
        let exit = decode(&raw);
        match exit {
            VmExit::Cpuid => {
                self.counters.cpuid += 1;
                self.cpuid();
                self.skip(&raw)?;
            }
            VmExit::Hlt => {
                // L2 waits for an interrupt: deliver the one it waits for.
                self.counters.hlt += 1;
                self.counters.injections += 1;
                self.skip(&raw)?;
                self.pending = Some(EventInfo::external_interrupt(layout::L2_INTERRUPT_VECTOR));
            }
            VmExit::IoInstruction {
                port,
                size,
                direction,
                string: None,
                ..
            } => {
                if let Some(value) = self.io(port, size, direction)? {
                    return Ok(Flow::End(value));
                }
                self.skip(&raw)?;
            }
            VmExit::Rdmsr | VmExit::Wrmsr => {
                self.counters.msr += 1;
                let msr = self.gpr(Gpr::Rcx) as u32;
                if msr != layout::L1_MSR {
                    // Not an MSR of L1's virtual machine: #GP(0), as hardware would.
                    self.pending = Some(EventInfo::hardware_exception(
                        vcpu::exit::vector::GP,
                        Some(0),
                    ));
                    return Ok(Flow::Resume);
                }
                if exit == VmExit::Rdmsr {
                    self.set_gpr(Gpr::Rax, self.l1_msr & 0xffff_ffff);
                    self.set_gpr(Gpr::Rdx, self.l1_msr >> 32);
                } else {
                    self.l1_msr = (self.gpr(Gpr::Rdx) << 32) | (self.gpr(Gpr::Rax) & 0xffff_ffff);
                }
                self.skip(&raw)?;
            }
            VmExit::EptViolation { gpa, .. } => {
                self.counters.ept_violations += 1;
                self.ept_violation(gpa)?;
            }
            VmExit::EptMisconfiguration { gpa } => {
                self.counters.misconfigurations += 1;
                self.misconfiguration(gpa)?;
            }
            VmExit::ExceptionOrNmi {
                vector: vcpu::exit::vector::UD,
                kind: EventType::HardwareException,
                ..
            } => {
                // Intercepted through the exception bitmap; L2 handles its own #UD.
                self.counters.invalid_opcode += 1;
                self.pending = Some(EventInfo::hardware_exception(vcpu::exit::vector::UD, None));
            }
            VmExit::ExceptionOrNmi {
                kind: EventType::Nmi,
                ..
            } => self.counters.nmi += 1,
            // Acknowledged on exit; this hypervisor has no device that interrupts.
            VmExit::ExternalInterrupt { .. } => self.counters.external_interrupts += 1,
            other => {
                println!("l1hv: vcpu{}: unexpected exit {other:?}", self.index);
                return Err(fail::UNEXPECTED_EXIT);
            }
        }
        Ok(Flow::Resume)
    }

    /// CPUID for L2: L1's own leaf, or the processor's answer (as L1 gets it) with VMX hidden.
    fn cpuid(&mut self) {
        let leaf = self.gpr(Gpr::Rax) as u32;
        let subleaf = self.gpr(Gpr::Rcx) as u32;
        let answer = if leaf == leaf::L1 {
            [self.index as u32, leaf::L1_SIGNATURE, 0, 0]
        } else {
            let mut answer = arch::cpuid(leaf, subleaf);
            if leaf == 1 {
                answer[2] &= !(1 << 5);
            }
            answer
        };
        for (gpr, value) in [Gpr::Rax, Gpr::Rbx, Gpr::Rcx, Gpr::Rdx]
            .into_iter()
            .zip(answer)
        {
            self.set_gpr(gpr, u64::from(value));
        }
    }

    /// Port I/O from L2 (only ports L1's bitmap intercepts exit). `Some(value)`: L2 ended.
    fn io(&mut self, port: u16, size: u8, direction: IoDirection) -> Result<Option<u32>, u32> {
        let mask = match size {
            1 => 0xff,
            2 => 0xffff,
            _ => 0xffff_ffff,
        };
        let value = (self.gpr(Gpr::Rax) & mask) as u32;
        let input = match (direction, port) {
            (IoDirection::Out, port::SERIAL) => {
                self.serial(value as u8);
                None
            }
            (IoDirection::Out, port::SERIAL..=port::SERIAL_LAST) => None,
            (IoDirection::In, port::SERIAL_LSR) => Some(u32::from(port::LSR_IDLE)),
            (IoDirection::In, port::SERIAL..=port::SERIAL_LAST) => Some(0),
            (IoDirection::Out, port::END) => return Ok(Some(value)),
            (IoDirection::Out, port::RESULT) => {
                arch::outl(port::RESULT, value);
                if self.result_count < self.results.len() {
                    self.results[self.result_count] = value;
                    self.result_count += 1;
                }
                None
            }
            (IoDirection::Out, port::REVOKE) => {
                self.revoke(u64::from(value))?;
                None
            }
            (IoDirection::In, port::SHADOW_FAULTS) => Some(arch::inl(port::SHADOW_FAULTS)),
            (IoDirection::Out, port::TEST) => {
                let answer = self.request(value, self.gpr(Gpr::Rsi))?;
                self.set_gpr(Gpr::Rax, answer);
                None
            }
            _ => {
                println!(
                    "l1hv: vcpu{}: unexpected {direction:?} port {port:#x}",
                    self.index
                );
                return Err(fail::UNEXPECTED_EXIT);
            }
        };
        if let Some(input) = input {
            // IN writes AL, AX or EAX (the latter zero-extends into RAX).
            let rax = self.gpr(Gpr::Rax);
            let merged = if size == 4 {
                u64::from(input)
            } else {
                (rax & !mask) | (u64::from(input) & mask)
            };
            self.set_gpr(Gpr::Rax, merged);
        }
        Ok(None)
    }

    /// A byte L2 wrote to its serial port: forwarded line by line, prefixed.
    fn serial(&mut self, byte: u8) {
        let line = &mut self.line;
        if byte != b'\n' && line.len < line.bytes.len() {
            line.bytes[line.len] = byte;
            line.len += 1;
            return;
        }
        let text = core::str::from_utf8(&line.bytes[..line.len]).unwrap_or("?");
        println!("l2.{}: {text}", self.index);
        line.len = 0;
    }

    /// L2 asks for the revocation of the on-demand page behind its page `l2_gpa`: L1 finds the
    /// L1 page in its EPT and asks the L0 pager itself (docs/nested.md, port 0xf6).
    fn revoke(&mut self, l2_gpa: u64) -> Result<(), u32> {
        match self.ept.translate(l2_gpa) {
            Some(l1_gpa) if (l1::ON_DEMAND_BASE..l1::ON_DEMAND_END).contains(&l1_gpa) => {
                self.counters.revocations += 1;
                arch::outl(port::REVOKE, (l1_gpa & !(PAGE - 1)) as u32);
                Ok(())
            }
            other => {
                println!("l1hv: vcpu{}: revoke {l2_gpa:#x} -> {other:?}", self.index);
                Err(fail::REVOKE)
            }
        }
    }

    /// L2's requests on L1's test port.
    fn request(&mut self, command: u32, argument: u64) -> Result<u64, u32> {
        match command {
            request::REMAP if argument == l2::REMAP => {
                // A new L1 page with new contents; the old translation is cached: INVEPT.
                let page = memory::page()?;
                memory::fill_pattern(page, l2::REMAP, 1);
                self.ept.map(l2::REMAP, page, PageSize::Size4K)?;
                self.invept()?;
                self.counters.remaps += 1;
            }
            request::INJECT => {
                self.counters.injections += 1;
                self.pending = Some(EventInfo::external_interrupt(argument as u8));
            }
            request::REPORT_LARGE_FAULTS => self.reports.large_faults = Some(argument),
            request::REPORT_MIGRATION => self.reports.migration = Some(argument),
            _ => {
                println!(
                    "l1hv: vcpu{}: unknown request {command} {argument:#x}",
                    self.index
                );
                return Err(fail::UNEXPECTED_EXIT);
            }
        }
        Ok(0)
    }

    /// An EPT violation: inside a lazy window, map the page and resume (L2 retries the access).
    fn ept_violation(&mut self, gpa: u64) -> Result<(), u32> {
        let page = gpa & !(PAGE - 1);
        let found = self.windows.iter().enumerate().find_map(|(i, w)| {
            w.filter(|w| (w.base..w.base + w.pages * PAGE).contains(&page))
                .map(|w| (i, w))
        });
        let Some((i, window)) = found else {
            println!(
                "l1hv: vcpu{}: EPT violation at {gpa:#x} outside the lazy windows",
                self.index
            );
            return Err(fail::UNEXPECTED_EXIT);
        };
        if let Some(w) = self.windows[i].as_mut() {
            w.violations += 1;
        }
        if self.ept.translate(page).is_some() {
            // Mapped already (processors cache no translation for a not-present entry, §29.4):
            // let L2 retry.
            return Ok(());
        }
        let l1_page = match window.backing {
            Backing::Fill => {
                let l1_page = memory::page()?;
                memory::fill_pattern(l1_page, page, 0);
                l1_page
            }
            Backing::Prefilled(base) => base + (page - window.base),
        };
        self.ept.map(page, l1_page, PageSize::Size4K)?;
        if window.invept {
            self.invept()?;
        }
        Ok(())
    }

    /// An EPT misconfiguration: expected only at the armed page (mode 2), whose entry L1 then
    /// repairs (and invalidates, §29.4.3) before resuming L2.
    fn misconfiguration(&mut self, gpa: u64) -> Result<(), u32> {
        match self.misconfigured.take() {
            Some((page, slot, good)) if gpa & !(PAGE - 1) == page => {
                arch::phys_write(slot, good);
                self.invept()
            }
            armed => {
                println!(
                    "l1hv: vcpu{}: EPT misconfiguration at {gpa:#x} (armed {:#x?})",
                    self.index,
                    armed.map(|a| a.0)
                );
                Err(fail::UNEXPECTED_EXIT)
            }
        }
    }
}
