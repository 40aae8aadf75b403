//! A nested guest: an L1 hypervisor (`docs/nested.md`) whose guest-physical memory the L0
//! pager owns, whose VMX the VMM emulates with `vcpu::nested`, and whose L2 guests run on
//! shadow EPTs ([`crate::shadow::Nested`]).
//!
//! # Start
//! L1's EPT comes from the pager (`Nested::fetch_l1_ept`, into [`slot::L1_EPT`]); the VMM
//! writes L1's image, GDT, identity page tables and stacks into L1's zeroed backed memory
//! through it (`EptWrite`), creates one vCPU object per virtual CPU on it (badge `guest << 8 |
//! index`) and writes the same 64-bit boot state as for a plain guest. The shadows get a
//! `2^NESTED_POOL_ORDER`-page piece of `protocol::SHADOW_POOL` and the slots
//! [`slot::SHADOWS`].
//!
//! # What L1 sees
//! CPUID with VMX (leaf 1 ECX bit 5), leaf 0x4000_0000 ("capvisor") and 0x4000_0001 (EAX: the
//! physical CPU its vCPU object is bound to); IA32_FEATURE_CONTROL 5 and the capability MSRs
//! filtered by `vcpu::nested::advertised` over the kernel's (`VmxCapability`); MOV to CR0/CR4
//! (CR4.VMXE is the VMM's: L1 reads back what it wrote); the 16550, ports 0xf4 (end), 0xf5
//! (results), 0xf6 (revoke an on-demand page through the pager) and 0xf7 (shadow faults fixed
//! for this vCPU). Every VMX instruction exit goes to `NestedVmx`, its memory operand
//! translated through L1's own page tables (the `ept` crate's walker over L1 memory read with
//! `EptRead`), and its outcome applied: RFLAGS, the destination, RIP past the instruction.
//!
//! # L2
//! At L1's first VMLAUNCH on a virtual CPU the VMM creates that virtual CPU's **L2 vCPU
//! object** (badge `| L2_BADGE`) on the shadow EPT `Nested::activate` returns for L1's EPTP
//! (rebound with `VcpuBind` whenever the answer changes; L1's own EPT when L1 does not enable
//! EPT), writes the state `NestedVmx::l2_entry` builds, runs it and stops L1's object. L2's
//! exits: EPT violations go to `Nested::l2_ept_violation` (fixed: L2 resumes; reflected: the
//! exit is written into L1's VMCS12); everything L1 asked for (`exit_belongs_to_l1`) is
//! reflected (`reflect_exit`: L1's new state is written into L1's object, which runs again while
//! L2's stops); the rest L0 handles for L2 as it would for L1. One of the two objects of a
//! virtual CPU runs at a time.
//!
//! # Migration
//! With `FLAG_MIGRATE` and 2 CPUs, the last virtual CPU moves to the next CPU at its second
//! CPUID 0x4000_0001 (asked by L2, answered by L1 through its own CPUID, which then reports
//! the new CPU): both its objects move (`VcpuSetAffinity`, the kernel flushes on arrival) and
//! `Nested::migrate` records it. At that virtual CPU's next exit it moves back. The reason is
//! Bochs: it delivers no external interrupt (so no VM exit) to a guest running with
//! RFLAGS.IF = 0, external-interrupt exiting notwithstanding, and l1hv spin-waits for the other
//! vCPUs' reports with interrupts disabled. A vCPU spinning on the VMM's CPU would keep the
//! VMM from running (the IPI that wakes it does not preempt the vCPU), and the other vCPU
//! from making progress; on its own CPU it only spins. The kernel's VMX-preemption-timer slice
//! now bounds how long such a vCPU keeps a CPU, but a slice is long in emulated time, so the
//! move back stays: it keeps the VMM responsive rather than merely live.
//!
//! Nothing L1 or L2 controls can panic the VMM: bad values end the guest (an outcome for the
//! root task) or become the faults the SDM prescribes.

use crate::devices::{self, SerialLine, msr};
use crate::guest::{Report, Request, boot_state, gdt_words, identity_tables};
use crate::memory::{FastUtcb, Image};
use crate::shadow::{L2Fault, Nested, NestedError, ShadowPool, offered_ept_capabilities};
use crate::slot;
use abi::elf::Executable;
use abi::{ALL_EXITS, Status, vcpu_config};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::Cell;
use core::fmt;
use ept::entry::Rights;
use ept::walk::{MemoryError, PhysMemory, WalkError, X86Paging, walk};
use rt::Selector;
use rt::layout::SELF_PD;
use rt::nested::pager::{self, Layout};
use rt::sys;
use rt::vmx::protocol::{self, Outcome, layout, port};
use rt::vmx::{self, ExitCall, ExitHeader, ExitReply, MessageWords};
use vcpu::controls::{CR4_VMXE, ProcessorBasedControls, VmxCapabilities};
use vcpu::exit::{
    CrAccess, EventInfo, EventType, ExitReason, IoDirection, RawExit, VmExit, decode, vector,
};
use vcpu::message::{ControlState, DecodeError, ExitMessage, GuestState, Reply, ResumeAction};
use vcpu::message::{EXIT_MESSAGE_WORDS, StateMask};
use vcpu::nested::{
    self as vmx_emulation, EptFault, EptInvalidation, L0Requirements, L1_VMX_EXIT_STATE, L1Memory,
    L1Resume, L2_EXIT_STATE, NestedVmx, Outcome as VmxOutcome, SHADOW_READ_ONLY, SHADOW_READ_WRITE,
};
use vcpu::qualification::EptViolationQualification;
use vcpu::vmcs::{VmcsAccess, VmcsField};

/// Priority of every vCPU object (as for plain guests: below the VMM's).
const VCPU_PRIORITY: u8 = 90;
/// Badge bit of an L2 vCPU object (the virtual CPU's index is in bits 6:0).
const L2_BADGE: u32 = 0x80;
/// CR0 of L1 at boot: PE, MP, ET, NE, PG.
const CR0: u64 = 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 31);
const CR0_PG: u64 = 1 << 31;
const CR0_WP: u64 = 1 << 16;
const EFER_NXE: u64 = 1 << 11;
/// CPUID leaf 0x4000_0001: EAX = the physical CPU (`docs/nested.md`).
const PHYSICAL_CPU_LEAF: u32 = 0x4000_0001;
/// L1's ports beyond the plain guest's (`docs/nested.md`).
const PORT_REVOKE: u16 = 0xf6;
const PORT_SHADOW_FAULTS: u16 = 0xf7;
/// Results kept (port 0xf5).
const MAX_RESULTS: usize = 16;

/// Exit reasons of the VMX instructions and VMCALL (SDM Vol. 3D Appendix C).
const VMX_EXIT_REASONS: [u64; 13] = [18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 50, 53, 59];

/// The state groups each exit of an L1 vCPU object carries; the first entry is the default.
fn l1_masks() -> [(u64, StateMask); 8] {
    [
        (
            ALL_EXITS,
            StateMask::EXIT_INFO
                .union(StateMask::GPRS)
                .union(StateMask::RIP_RSP_RFLAGS),
        ),
        (ExitReason::Cpuid as u64, StateMask::GPRS),
        (
            ExitReason::IoInstruction as u64,
            StateMask::EXIT_INFO.union(StateMask::GPRS),
        ),
        (ExitReason::EptViolation as u64, StateMask::EXIT_INFO),
        (ExitReason::Rdmsr as u64, MSR_STATE),
        (ExitReason::Wrmsr as u64, MSR_STATE),
        (
            ExitReason::ControlRegisterAccess as u64,
            StateMask::EXIT_INFO
                .union(StateMask::GPRS)
                .union(StateMask::RIP_RSP_RFLAGS)
                .union(StateMask::CR)
                .union(StateMask::CONTROLS),
        ),
        (
            ExitReason::Hlt as u64,
            StateMask::EXIT_INFO.union(StateMask::RIP_RSP_RFLAGS),
        ),
    ]
}

/// What RDMSR/WRMSR handling reads and writes.
const MSR_STATE: StateMask = StateMask::GPRS
    .union(StateMask::RIP_RSP_RFLAGS)
    .union(StateMask::SEGMENTS)
    .union(StateMask::EFER_PAT)
    .union(StateMask::SYSCALL_MSRS)
    .union(StateMask::TSC);

/// The groups a VMX-instruction exit of L1 carries.
const VMX_STATE: StateMask = L1_VMX_EXIT_STATE.union(StateMask::EXIT_INFO);

/// One virtual CPU of L1: its two vCPU objects and its VMX state.
struct VirtualCpu {
    index: u32,
    /// L1's vCPU object.
    l1: Selector,
    /// L2's vCPU object, created at L1's first VM entry.
    l2: Option<Selector>,
    /// The EPT object L2's vCPU is bound to.
    bound: Option<Selector>,
    /// L2's vCPU controls as the kernel reported them at creation.
    l2_controls: ControlState,
    vmx: Box<NestedVmx>,
    /// The physical CPU both objects are bound to.
    cpu: u64,
    /// Neither stopped nor failed to start: one of its objects will exit again.
    running: bool,
    /// L2's object runs (L1's is stopped).
    in_l2: bool,
    /// L1's TSC offset (L2 sees L1's TSC).
    tsc_offset: u64,
    /// CPUID 0x4000_0001 queries answered (the migration trigger).
    cpu_queries: u64,
    /// Migrated: the CPU to move back to at the next exit.
    return_to: Option<u64>,
    line: SerialLine,
    /// L2 exits reflected to L1, L1 VMX-instruction exits emulated, L2 exits L0 handled.
    l2_reflected: u64,
    l1_vmx_exits: u64,
    l2_in_l0: u64,
    /// VMCS shadowing: the fields L1 VMREADs from the shadow VMCS (the read-write ones
    /// first, `shadow_rw` of them), empty without shadowing.
    shadow_fields: Vec<VmcsField>,
    shadow_rw: usize,
    /// What the shadow VMCS holds of each of `shadow_fields` (while `mirrored`), and where
    /// each field sits in a VMCS image.
    shadow_values: Vec<u64>,
    shadow_positions: Vec<usize>,
    /// The VMCS12 the shadow VMCS holds and is linked for (L1's current VMCS).
    mirrored: Option<u64>,
}

/// The most fields the VMM shadows, and a set of (field, value) pairs for them.
const SHADOW_FIELDS_MAX: usize = SHADOW_READ_WRITE.len() + SHADOW_READ_ONLY.len();
type ShadowPairs = [(VmcsField, u64); SHADOW_FIELDS_MAX];

/// A switch between a virtual CPU's two objects, answering the current exit.
#[derive(Clone, Copy)]
struct Switch {
    v: usize,
    target: Selector,
    flags: u64,
    to_l2: bool,
}

/// How the console lines of a virtual CPU begin.
struct Prefix {
    guest: u64,
    vcpu: Option<u32>,
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.vcpu {
            Some(v) => write!(f, "[guest{}.{}] ", self.guest, v),
            None => write!(f, "[guest{}] ", self.guest),
        }
    }
}

/// L1 memory for `vcpu::nested`: through L1's EPT (`EptRead`, `EptWrite`), the pager
/// providing on-demand pages on first touch.
struct L1Mem<'a> {
    nested: &'a mut Nested,
}

impl L1Mem<'_> {
    fn word(&mut self, gpa: u64) -> Option<u64> {
        let mut w = [0];
        match self.nested.read_l1(gpa, &mut w) {
            Ok(()) => Some(w[0]),
            Err(Status::NotBacked) if provide(gpa) => {
                self.nested.read_l1(gpa, &mut w).ok().map(|()| w[0])
            }
            Err(_) => None,
        }
    }

    fn set_word(&mut self, gpa: u64, value: u64) -> bool {
        match self.nested.write_l1(gpa, &[value]) {
            Ok(()) => true,
            Err(Status::NotBacked) if provide(gpa) => self.nested.write_l1(gpa, &[value]).is_ok(),
            Err(_) => false,
        }
    }
}

/// Asks the pager for the on-demand page holding `gpa`; whether it is there now.
fn provide(gpa: u64) -> bool {
    pager::provide(protocol::PAGER, gpa).is_ok()
}

impl L1Memory for L1Mem<'_> {
    fn read_u64(&mut self, gpa: u64) -> Option<u64> {
        let offset = gpa % 8;
        let low = self.word(gpa - offset)?;
        if offset == 0 {
            return Some(low);
        }
        let high = self.word(gpa.checked_add(8)? - offset)?;
        Some((low >> (8 * offset)) | (high << (64 - 8 * offset)))
    }

    fn write_u64(&mut self, gpa: u64, value: u64) -> bool {
        let offset = gpa % 8;
        if offset == 0 {
            return self.set_word(gpa, value);
        }
        let (Some(first), Some(second)) = (Some(gpa - offset), gpa.checked_add(8 - offset)) else {
            return false;
        };
        let (Some(low), Some(high)) = (self.word(first), self.word(second)) else {
            return false;
        };
        let shift = 8 * offset;
        let low = (low & !(u64::MAX << shift)) | (value << shift);
        let high = (high & (u64::MAX << shift)) | (value >> (64 - shift));
        self.set_word(first, low) && self.set_word(second, high)
    }
}

/// L1 memory for the page-table walker (reads only, no provision: L1's page tables live in
/// its backed memory).
struct L1Tables<'a>(&'a Nested);

impl PhysMemory for L1Tables<'_> {
    fn read_u64(&self, address: u64) -> Result<u64, MemoryError> {
        let mut w = [0];
        self.0
            .read_l1(address, &mut w)
            .map(|()| w[0])
            .map_err(|_| MemoryError::NotBacked { address })
    }
}

/// A running L1 hypervisor.
pub struct L1Guest {
    number: u64,
    request: Request,
    nested: Nested,
    layout: Layout,
    /// The capability MSRs L1 is shown.
    advertised: VmxCapabilities,
    max_phys_bits: u8,
    vcpus: Vec<VirtualCpu>,
    pd_created: bool,
    outcome: Option<(Outcome, u64)>,
    /// The answer to the exit being handled is a switch to the other object (set by the
    /// handler, made by the exit loop).
    switch: Option<Switch>,
    stats: [u64; protocol::REPORT_WORDS],
    results: Vec<u64>,
}

/// Takes the next shadow-pool piece into `slot::SHADOW_PIECE`.
fn take_shadow_piece(pieces: &mut u64) -> Result<(), Status> {
    let available = 1 << (protocol::SHADOW_POOL_ORDER - protocol::NESTED_POOL_ORDER);
    if *pieces >= available {
        return Err(Status::OutOfMemory);
    }
    sys::mem_split(
        protocol::SHADOW_POOL,
        *pieces << protocol::NESTED_POOL_ORDER,
        protocol::NESTED_POOL_ORDER,
        slot::SHADOW_PIECE,
    )?;
    *pieces += 1;
    Ok(())
}

fn nested_status(e: NestedError) -> Status {
    match e {
        NestedError::BadCapability(s) | NestedError::Status(s) => s,
        NestedError::Pager { status, .. } => status,
        NestedError::NoSuchVcpu => Status::InvalidArgument,
        NestedError::Engine(_) => Status::Inconsistent,
    }
}

/// The host's VMX capability MSRs, as the kernel read them.
fn host_capabilities() -> VmxCapabilities {
    VmxCapabilities::from_msrs(|index| vmx::vmx_capability(index).unwrap_or(0))
}

/// MAXPHYADDR of the VMM's CPU (CPUID.80000008H:EAX[7:0]; 36 without the leaf).
fn max_phys_bits() -> u8 {
    if crate::memory::cpuid(0x8000_0000, 0)[0] >= 0x8000_0008 {
        crate::memory::cpuid(0x8000_0008, 0)[0] as u8
    } else {
        36
    }
}

impl L1Guest {
    /// Builds L1: its memory from the pager (image, system pages), its shadows' engine, its
    /// vCPU objects with their boot state. Nothing runs yet.
    pub fn start(
        number: u64,
        request: Request,
        image: Image,
        pieces: &mut u64,
    ) -> Result<Self, Status> {
        let file = image
            .bytes()
            .get(..request.image_size as usize)
            .ok_or(Status::OutOfRange)?;
        let executable = abi::elf::parse(file).map_err(|e| {
            log::error!("L1 image: {e}");
            Status::InvalidArgument
        })?;
        take_shadow_piece(pieces)?;
        let layout = match Nested::fetch_l1_ept(protocol::PAGER, slot::L1_EPT) {
            Ok(layout) => layout,
            Err(e) => {
                let _ = sys::cap_delete(slot::SHADOW_PIECE);
                return Err(nested_status(e));
            }
        };
        let advertised = vmx_emulation::advertised(&host_capabilities());
        let max_phys_bits = max_phys_bits();
        let pool = ShadowPool {
            memory: slot::SHADOW_PIECE,
            slots: slot::SHADOWS,
        };
        let capabilities = offered_ept_capabilities(advertised.ept_vpid().bits(), max_phys_bits);
        let nested = match Nested::new(slot::L1_EPT, protocol::PAGER, pool, capabilities) {
            Ok(n) => n,
            Err(e) => {
                let _ = sys::cap_delete(slot::SHADOW_PIECE);
                let _ = sys::cap_delete(slot::L1_EPT);
                return Err(nested_status(e));
            }
        };
        let mut guest = Self {
            number,
            request,
            nested,
            layout,
            advertised,
            max_phys_bits,
            vcpus: Vec::new(),
            pd_created: false,
            outcome: None,
            switch: None,
            stats: [0; protocol::REPORT_WORDS],
            results: Vec::new(),
        };
        guest.stats[protocol::R_MIGRATED_FROM] = u64::MAX;
        guest.stats[protocol::R_MIGRATED_TO] = u64::MAX;
        match guest.build(file, &executable) {
            Ok(()) => Ok(guest),
            Err(e) => {
                let _ = guest.dismantle();
                Err(e)
            }
        }
    }

    fn build(&mut self, file: &[u8], executable: &Executable) -> Result<(), Status> {
        self.load(file, executable)?;
        sys::pd_create(SELF_PD, slot::GUEST_PD)?;
        self.pd_created = true;
        for index in 0..self.request.vcpus as u32 {
            self.create_vcpu(index, executable.entry)?;
        }
        Ok(())
    }

    /// Writes the image, the GDT, the identity page tables into L1's backed memory (zeroed by
    /// the pager); the stacks are zero already.
    fn load(&mut self, file: &[u8], executable: &Executable) -> Result<(), Status> {
        let backed = self.layout.backed_end;
        let stacks_end = layout::STACKS + self.request.vcpus * layout::STACK_SIZE;
        if stacks_end > layout::IMAGE || backed < layout::IMAGE {
            return Err(Status::OutOfRange);
        }
        let mut entry_ok = false;
        for segment in executable.segments() {
            let end = segment
                .vaddr
                .checked_add(segment.mem_size)
                .ok_or(Status::OutOfRange)?;
            if segment.vaddr < layout::IMAGE || end > backed {
                log::error!(
                    "L1 image segment {:#x}..{end:#x} outside {:#x}..{backed:#x}",
                    segment.vaddr,
                    layout::IMAGE
                );
                return Err(Status::OutOfRange);
            }
            entry_ok |= segment.executable && (segment.vaddr..end).contains(&executable.entry);
            self.nested
                .write_l1_bytes(segment.vaddr, segment.bytes(file))?;
        }
        if !entry_ok {
            return Err(Status::InvalidArgument);
        }
        self.nested.write_l1(layout::SYSTEM, &gdt_words())?;
        for (gpa, table) in identity_tables() {
            self.nested.write_l1(gpa, &table)?;
        }
        Ok(())
    }

    fn create_vcpu(&mut self, index: u32, entry: u64) -> Result<(), Status> {
        let selector = slot::FIRST_VCPU + u64::from(index);
        let cpu = u64::from(index) % self.request.cpus;
        vmx::vcpu_create(
            slot::GUEST_PD,
            selector,
            slot::L1_EPT,
            slot::EXIT_ENDPOINT,
            vcpu_config(VCPU_PRIORITY, cpu as u8, self.badge(index)),
        )?;
        self.vcpus.push(VirtualCpu {
            index,
            l1: selector,
            l2: None,
            bound: None,
            l2_controls: ControlState::default(),
            vmx: Box::new(NestedVmx::new(self.advertised, self.max_phys_bits)),
            cpu,
            running: false,
            in_l2: false,
            tsc_offset: 0,
            cpu_queries: 0,
            return_to: None,
            line: SerialLine::new(),
            l2_reflected: 0,
            l1_vmx_exits: 0,
            l2_in_l0: 0,
            shadow_fields: Vec::new(),
            shadow_rw: 0,
            shadow_values: Vec::new(),
            shadow_positions: Vec::new(),
            mirrored: None,
        });
        self.shadow_vmcs(self.vcpus.len() - 1)?;
        check_flag_arguments(selector)?;
        for (reason, mask) in l1_masks() {
            vmx::vcpu_set_mask(selector, reason, mask)?;
        }
        for reason in VMX_EXIT_REASONS {
            vmx::vcpu_set_mask(selector, reason, VMX_STATE)?;
        }
        let current = vmx::vcpu_read_state(selector, StateMask::CONTROLS)?;
        let rsi = self.request.vcpus | (self.request.mode_code << 8);
        vmx::vcpu_write_state(selector, &boot_state(index, rsi, entry, CR0, &current))
    }

    /// Gives virtual CPU `v`'s L1 object a shadow VMCS (unlinked until L1 has a current VMCS)
    /// and lets L1 VMREAD the fields of [`SHADOW_READ_ONLY`] and VMREAD and VMWRITE those of
    /// [`SHADOW_READ_WRITE`] without an exit, as far as L1's VMCS supports them. Without VMCS
    /// shadowing every VMREAD and VMWRITE exits and is emulated.
    fn shadow_vmcs(&mut self, v: usize) -> Result<(), Status> {
        let l1 = self.vcpus[v].l1;
        match vmx::vcpu_shadow_vmcs(l1, true) {
            Ok(()) => {}
            Err(Status::Unsupported) => return Ok(()),
            Err(e) => return Err(e),
        }
        vmx::vcpu_shadow_vmcs(l1, false)?;
        let cpu = &mut self.vcpus[v];
        let supported = |f: &VmcsField| cpu.vmx.supported_field(u64::from(f.encoding())).is_some();
        let rw: Vec<VmcsField> = SHADOW_READ_WRITE.into_iter().filter(supported).collect();
        let ro: Vec<VmcsField> = SHADOW_READ_ONLY.into_iter().filter(supported).collect();
        vmx::vcpu_shadow_fields(l1, &rw, true, true)?;
        vmx::vcpu_shadow_fields(l1, &ro, true, false)?;
        cpu.shadow_rw = rw.len();
        cpu.shadow_fields = rw;
        cpu.shadow_fields.extend(ro);
        cpu.shadow_values = alloc::vec![0; cpu.shadow_fields.len()];
        cpu.shadow_positions = cpu
            .shadow_fields
            .iter()
            .map(|f| f.position().ok_or(Status::Inconsistent))
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// Takes L1's VMWRITEs of shadowed fields from the shadow VMCS into the current VMCS12
    /// (at each VMX-instruction exit of L1, before anything reads them): from the exit
    /// message, which carries them after its 78 words (`message_words` in all), or else with
    /// `VcpuShadowAccess`.
    fn pull_shadow(&mut self, v: usize, message_words: usize) -> Result<(), Status> {
        let cpu = &mut self.vcpus[v];
        if cpu.mirrored.is_none() || cpu.shadow_rw == 0 {
            return Ok(());
        }
        let mut pairs = [(VmcsField::GUEST_RIP, 0u64); SHADOW_READ_WRITE.len()];
        let pairs = &mut pairs[..cpu.shadow_rw];
        for (pair, &field) in pairs.iter_mut().zip(&cpu.shadow_fields) {
            pair.0 = field;
        }
        // The read-write fields were listed first, so they lead the carried values.
        let mut carried = [0u64; 1 + SHADOW_READ_WRITE.len()];
        let n = cpu.shadow_rw;
        if message_words > EXIT_MESSAGE_WORDS + n {
            FastUtcb.read(EXIT_MESSAGE_WORDS, &mut carried[..1 + n]);
        }
        if carried[0] as usize == n {
            for (pair, &value) in pairs.iter_mut().zip(&carried[1..=n]) {
                pair.1 = value;
            }
        } else {
            vmx::vcpu_shadow_read(cpu.l1, pairs)?;
        }
        for (i, &(_, value)) in pairs.iter().enumerate() {
            cpu.shadow_values[i] = value;
        }
        cpu.vmx.pull_shadow(pairs);
        Ok(())
    }

    /// The shadow fields whose VMCS12 values differ from what the shadow VMCS holds, when it
    /// mirrors L1's current VMCS12 (`None` when it mirrors another one or none: everything
    /// must be written, and the shadow linked or unlinked, by [`Self::push_shadow`]).
    fn shadow_delta(&self, v: usize) -> Option<(ShadowPairs, usize)> {
        let cpu = &self.vcpus[v];
        let mut pairs = [(VmcsField::GUEST_RIP, 0u64); SHADOW_FIELDS_MAX];
        if cpu.shadow_fields.is_empty() {
            return Some((pairs, 0));
        }
        let address = cpu.vmx.current_vmcs()?;
        let image = cpu.vmx.vmcs12()?;
        if cpu.mirrored != Some(address) {
            return None;
        }
        let mut n = 0;
        for ((&field, &held), &position) in cpu
            .shadow_fields
            .iter()
            .zip(&cpu.shadow_values)
            .zip(&cpu.shadow_positions)
        {
            let value = image.value_at(position).unwrap_or(0);
            if held != value {
                pairs[n] = (field, value);
                n += 1;
            }
        }
        Some((pairs, n))
    }

    /// Records that the shadow VMCS took `pairs`.
    fn shadow_took(&mut self, v: usize, pairs: &[(VmcsField, u64)]) {
        let cpu = &mut self.vcpus[v];
        for &(field, value) in pairs {
            if let Some(i) = cpu.shadow_fields.iter().position(|&f| f == field) {
                cpu.shadow_values[i] = value;
            }
        }
    }

    /// Makes the shadow VMCS equal to L1's current VMCS12 (after the server changed it: an
    /// emulated VMX instruction, a reflected exit), linking it, or unlinks it when L1 has no
    /// current VMCS.
    fn push_shadow(&mut self, v: usize) -> Result<(), Status> {
        if let Some((pairs, n)) = self.shadow_delta(v) {
            if n != 0 {
                vmx::vcpu_shadow_write(self.vcpus[v].l1, &pairs[..n])?;
                self.shadow_took(v, &pairs[..n]);
            }
            return Ok(());
        }
        let cpu = &mut self.vcpus[v];
        let Some((address, image)) = cpu.vmx.current_vmcs().zip(cpu.vmx.vmcs12()) else {
            if cpu.mirrored.take().is_some() {
                vmx::vcpu_shadow_vmcs(cpu.l1, false)?;
            }
            return Ok(());
        };
        let mut pairs = [(VmcsField::GUEST_RIP, 0u64); SHADOW_FIELDS_MAX];
        let pairs = &mut pairs[..cpu.shadow_fields.len()];
        for (pair, &field) in pairs.iter_mut().zip(&cpu.shadow_fields) {
            *pair = (field, image.read(field));
        }
        let l1 = cpu.l1;
        let was_linked = cpu.mirrored.take().is_some();
        vmx::vcpu_shadow_write(l1, pairs)?;
        self.shadow_took(v, pairs);
        if !was_linked {
            vmx::vcpu_shadow_vmcs(l1, true)?;
        }
        self.vcpus[v].mirrored = Some(address);
        Ok(())
    }

    fn badge(&self, index: u32) -> u32 {
        ((self.number as u32) << 8) | index
    }

    fn prefix(&self, v: usize) -> Prefix {
        Prefix {
            guest: self.number,
            vcpu: (self.request.vcpus > 1).then_some(self.vcpus[v].index),
        }
    }

    // ---- The run ----

    /// Runs L1 until every virtual CPU has ended, then reports.
    pub fn run(&mut self) -> Report {
        for v in 0..self.vcpus.len() {
            match vmx::vcpu_run(self.vcpus[v].l1) {
                Ok(()) => self.vcpus[v].running = true,
                Err(e) => {
                    log::error!("guest{}: VcpuRun of vcpu{v}: {e:?}", self.number);
                    self.set_outcome(Outcome::VmmError, e.code());
                    break;
                }
            }
        }
        if self.outcome.is_some() {
            self.recall_running();
        }
        if self.vcpus.iter().any(|v| v.running) {
            self.exit_loop();
        }
        for v in 0..self.vcpus.len() {
            let prefix = self.prefix(v);
            self.vcpus[v].line.flush(&prefix);
        }
        self.report()
    }

    fn exit_loop(&mut self) {
        let mut call = match vmx::exit_recv(slot::EXIT_ENDPOINT) {
            Ok(call) => call,
            Err(e) => {
                log::error!("guest{}: receiving exits: {e:?}", self.number);
                self.set_outcome(Outcome::VmmError, e.code());
                return;
            }
        };
        loop {
            self.stats[protocol::R_EXITS] += 1;
            let mut reply = self.handle(&call);
            if let Some(s) = self.switch.take() {
                match vmx::vcpu_switch(slot::EXIT_ENDPOINT, s.target, s.flags) {
                    Ok(next) => {
                        self.vcpus[s.v].in_l2 = s.to_l2;
                        call = next;
                        continue;
                    }
                    // Nothing happened: the exit still waits for an answer.
                    Err(e) if s.to_l2 && e == Status::InvalidArgument => {
                        reply = self.l2_state_refused(s.v, e);
                    }
                    Err(e) => {
                        reply = self.vmm_error(s.v, "VcpuSwitch", e);
                    }
                }
            }
            if !self.vcpus.iter().any(|v| v.running) {
                if let Err(e) = vmx::exit_reply(reply) {
                    log::error!("guest{}: last reply refused: {e:?}", self.number);
                }
                return;
            }
            call = match vmx::exit_reply_recv(slot::EXIT_ENDPOINT, reply) {
                Ok(call) => call,
                Err(e) => {
                    log::error!("guest{}: reply refused: {e:?}", self.number);
                    self.set_outcome(Outcome::VmmError, e.code());
                    self.recall_running();
                    let stop = vmx::write_action_to(&mut FastUtcb, ResumeAction::Stop);
                    if let Some((v, _)) = self.vcpu_of(&call) {
                        self.vcpus[v].running = false;
                    }
                    if !self.vcpus.iter().any(|v| v.running) {
                        let _ = vmx::exit_reply(stop);
                        return;
                    }
                    match vmx::exit_reply_recv(slot::EXIT_ENDPOINT, stop) {
                        Ok(call) => call,
                        Err(e) => {
                            log::error!("guest{}: stop refused: {e:?}", self.number);
                            return;
                        }
                    }
                }
            };
        }
    }

    /// The virtual CPU (its position in `vcpus`) an exit call comes from and whether from its
    /// L2 object.
    fn vcpu_of(&self, call: &ExitCall) -> Option<(usize, bool)> {
        let index = (call.badge & 0x7f) as usize;
        let l2 = call.badge & u64::from(L2_BADGE) != 0;
        (call.badge >> 8 == self.number & 0xff_ffff && index < self.vcpus.len())
            .then_some((index, l2))
    }

    fn set_outcome(&mut self, outcome: Outcome, detail: u64) {
        if self.outcome.is_none() {
            self.outcome = Some((outcome, detail));
        }
    }

    /// Recalls the running object of every running virtual CPU.
    fn recall_running(&self) {
        for cpu in self.vcpus.iter().filter(|v| v.running) {
            let object = if cpu.in_l2 { cpu.l2 } else { Some(cpu.l1) };
            if let Some(object) = object
                && let Err(e) = vmx::vcpu_recall(object)
            {
                log::warn!(
                    "guest{}: VcpuRecall of vcpu{}: {e:?}",
                    self.number,
                    cpu.index
                );
            }
        }
    }

    /// Stops virtual CPU `v` (the reply to its exit).
    fn stop(&mut self, v: usize) -> ExitReply {
        self.vcpus[v].running = false;
        vmx::write_action_to(&mut FastUtcb, ResumeAction::Stop)
    }

    /// Ends the guest with `outcome`: stops `v` and recalls the others.
    fn end(&mut self, v: usize, outcome: Outcome, detail: u64) -> ExitReply {
        self.set_outcome(outcome, detail);
        let reply = self.stop(v);
        self.recall_running();
        reply
    }

    /// Ends the guest because the VMM failed (`what` and the status logged).
    fn vmm_error(&mut self, v: usize, what: &str, status: Status) -> ExitReply {
        rt::println!("vmm: guest{} vcpu{v}: {what}: {status:?}", self.number);
        self.end(v, Outcome::VmmError, status.code())
    }

    fn undecodable(&mut self, v: usize, e: DecodeError) -> ExitReply {
        log::error!(
            "guest{}: undecodable exit message (word {})",
            self.number,
            e.word
        );
        self.end(v, Outcome::VmmError, Status::Inconsistent.code())
    }

    /// Answers one exit.
    fn handle(&mut self, call: &ExitCall) -> ExitReply {
        let Some((v, from_l2)) = self.vcpu_of(call) else {
            log::warn!(
                "guest{}: exit with unknown badge {:#x}",
                self.number,
                call.badge
            );
            return vmx::write_action_to(&mut FastUtcb, ResumeAction::Stop);
        };
        if self.outcome.is_some() || !self.vcpus[v].running {
            return self.stop(v);
        }
        if from_l2 != self.vcpus[v].in_l2 {
            log::error!(
                "guest{}: vcpu{v}: exit from its {} object while the other runs",
                self.number,
                if from_l2 { "L2" } else { "L1" }
            );
            return self.end(v, Outcome::VmmError, Status::Inconsistent.code());
        }
        if let Some(cpu) = self.vcpus[v].return_to.take() {
            self.move_vcpu(v, cpu);
        }
        if call.is_recall() {
            return ExitReply::Resume;
        }
        if call.exit_reason().is_none() {
            log::error!("guest{}: call with label {:#x}", self.number, call.label());
            return self.end(v, Outcome::Unhandled, u64::from(call.label()));
        }
        let header = match ExitHeader::read_from(&mut FastUtcb) {
            Ok(header) => header,
            Err(e) => return self.undecodable(v, e),
        };
        if from_l2 {
            self.handle_l2(v, &header.exit)
        } else {
            self.handle_l1(v, &header.exit, call.words[3], call.info.extra_words())
        }
    }

    // ---- Exits of L1 ----

    fn handle_l1(&mut self, v: usize, raw: &RawExit, rip: u64, words: usize) -> ExitReply {
        let exit = decode(raw);
        match exit {
            VmExit::Cpuid => return self.cpuid(v),
            VmExit::IoInstruction {
                port,
                size,
                direction,
                string: None,
                ..
            } => return self.io(v, port, size, direction),
            VmExit::EptViolation { gpa, .. } => return self.l1_ept_violation(v, gpa, raw),
            _ => {}
        }
        let msg = match vmx::read_exit_message_from(&mut FastUtcb) {
            Ok(msg) => msg,
            Err(e) => return self.undecodable(v, e),
        };
        let reply = match exit {
            VmExit::VmxInstruction { .. } => {
                self.vcpus[v].l1_vmx_exits += 1;
                if let Err(e) = self.pull_shadow(v, words) {
                    return self.vmm_error(v, "VcpuShadowAccess (read) of L1", e);
                }
                return self.vmx_instruction(v, &exit, &msg);
            }
            VmExit::Vmcall => {
                self.vcpus[v].l1_vmx_exits += 1;
                match self.vcpus[v].vmx.vmcall(&msg.state) {
                    Some(outcome) => return self.apply(v, outcome, msg.state, None),
                    None => inject(EventInfo::hardware_exception(vector::UD, None)),
                }
            }
            VmExit::Rdmsr => self.l1_rdmsr(v, msg.state),
            VmExit::Wrmsr => self.l1_wrmsr(v, msg.state),
            VmExit::ControlRegisterAccess { cr, access } => {
                match self.l1_cr_access(v, cr, access, msg.state) {
                    Some(reply) => reply,
                    None => {
                        rt::println!(
                            "vmm: guest{} vcpu{v}: CR{cr} access {access:?} not emulated",
                            self.number
                        );
                        let detail = ((v as u64) << 32) | 28;
                        return self.end(v, Outcome::Unhandled, detail);
                    }
                }
            }
            VmExit::Hlt => {
                rt::println!(
                    "vmm: guest{} vcpu{v}: L1 halted at rip {:#x}",
                    self.number,
                    msg.state.rip
                );
                return self.end(v, Outcome::Halted, v as u64);
            }
            VmExit::ExceptionOrNmi {
                vector: vector @ (vector::DB | vector::AC),
                kind: EventType::HardwareException,
                error_code,
                ..
            } => inject(EventInfo::hardware_exception(vector, error_code)),
            VmExit::TripleFault => {
                rt::println!(
                    "vmm: guest{} vcpu{v}: triple fault at rip {rip:#x}",
                    self.number
                );
                return self.end(v, Outcome::TripleFault, v as u64);
            }
            VmExit::InvalidGuestState { .. }
            | VmExit::MsrLoadFailure { .. }
            | VmExit::MachineCheckDuringEntry => {
                rt::println!(
                    "vmm: guest{} vcpu{v}: VM entry of L1 failed: {exit:?}",
                    self.number
                );
                let detail = ((v as u64) << 32) | u64::from(raw.reason);
                return self.end(v, Outcome::EntryFailure, detail);
            }
            other => {
                rt::println!(
                    "vmm: guest{} vcpu{v}: unhandled L1 exit {other:?} at rip {rip:#x}",
                    self.number
                );
                let detail = ((v as u64) << 32) | u64::from(raw.reason & 0xffff);
                return self.end(v, Outcome::Unhandled, detail);
            }
        };
        answer(&reply)
    }

    /// CPUID of L1: VMX shown, the hypervisor leaves answered; the migration trigger.
    fn cpuid(&mut self, v: usize) -> ExitReply {
        self.stats[protocol::R_CPUID_EXITS] += 1;
        let mut g = vmx::read_gprs_from(&mut FastUtcb);
        let leaf = g.rax as u32;
        if leaf == PHYSICAL_CPU_LEAF {
            self.vcpus[v].cpu_queries += 1;
            if self.request.migrate
                && self.request.cpus > 1
                && v + 1 == self.vcpus.len()
                && self.vcpus[v].cpu_queries == 2
            {
                self.migrate(v);
            }
        }
        let cpu = self.vcpus[v].cpu as u32;
        let [a, b, c, d] = devices::nested_cpuid(leaf, g.rcx as u32, v as u32, cpu);
        (g.rax, g.rbx, g.rcx, g.rdx) = (a.into(), b.into(), c.into(), d.into());
        vmx::write_gprs_reply_to(&mut FastUtcb, ResumeAction::Advance, Some(&g))
    }

    /// Moves virtual CPU `v` to the next CPU; it moves back at its next exit (see the module
    /// documentation: a vCPU that spins with interrupts disabled must not share a CPU with the
    /// VMM or another busy vCPU under Bochs).
    fn migrate(&mut self, v: usize) {
        let from = self.vcpus[v].cpu;
        let to = (from + 1) % self.request.cpus;
        if self.move_vcpu(v, to) {
            self.stats[protocol::R_MIGRATED_FROM] = from;
            self.stats[protocol::R_MIGRATED_TO] = to;
            self.vcpus[v].return_to = Some(from);
        }
    }

    /// Moves both vCPU objects of virtual CPU `v` to `cpu` (`VcpuSetAffinity`, running or not:
    /// the kernel flushes L2's shadow EPT and L1's EPT on the new CPU) and tells `Nested`.
    fn move_vcpu(&mut self, v: usize, cpu: u64) -> bool {
        let from = self.vcpus[v].cpu;
        let objects = [Some(self.vcpus[v].l1), self.vcpus[v].l2];
        for object in objects.into_iter().flatten() {
            if let Err(e) = vmx::vcpu_set_affinity(object, cpu) {
                rt::println!(
                    "vmm: guest{} vcpu{v}: VcpuSetAffinity to cpu {cpu}: {e:?}",
                    self.number
                );
                return false;
            }
        }
        self.vcpus[v].cpu = cpu;
        self.nested.migrate(v, cpu);
        rt::println!(
            "vmm: guest{} vcpu{v}: moved (its L1 and L2 vCPU objects) from cpu {from} to cpu {cpu}",
            self.number
        );
        true
    }

    /// L1's port I/O: the 16550, end, results, revocation, shadow faults.
    fn io(&mut self, v: usize, port: u16, size: u8, direction: IoDirection) -> ExitReply {
        self.stats[protocol::R_IO_EXITS] += 1;
        let mask = match size {
            1 => 0xff,
            2 => 0xffff,
            _ => 0xffff_ffff,
        };
        let mut g = vmx::read_gprs_from(&mut FastUtcb);
        if direction == IoDirection::In {
            let value = if port == PORT_SHADOW_FAULTS {
                self.nested.shadow_faults(v) as u32
            } else {
                devices::port_in(port, size)
            };
            let value = u64::from(value);
            g.rax = if size == 4 {
                value
            } else {
                (g.rax & !mask) | (value & mask)
            };
            return vmx::write_gprs_reply_to(&mut FastUtcb, ResumeAction::Advance, Some(&g));
        }
        let value = g.rax & mask;
        match port {
            port::SERIAL => {
                let prefix = self.prefix(v);
                self.vcpus[v].line.put(value as u8, &prefix);
            }
            port::DEBUG_EXIT => {
                let prefix = self.prefix(v);
                self.vcpus[v].line.flush(&prefix);
                if value != 0 {
                    rt::println!(
                        "vmm: guest{} vcpu{v}: L1 reports failure {value:#x}",
                        self.number
                    );
                    return self.end(v, Outcome::Fail, ((v as u64) << 32) | value);
                }
                return self.stop(v);
            }
            port::RESULT if self.results.len() < MAX_RESULTS => self.results.push(value),
            PORT_REVOKE => match self.nested.revoke_l1_page(value) {
                Ok(r) => log::debug!(
                    "guest{} vcpu{v}: revoked {value:#x}: generation {}, {} entries",
                    self.number,
                    r.generation,
                    r.entries_removed
                ),
                Err(e) => rt::println!(
                    "vmm: guest{} vcpu{v}: revoking L1 page {value:#x}: {e:?}",
                    self.number
                ),
            },
            _ => {}
        }
        vmx::write_gprs_reply_to(&mut FastUtcb, ResumeAction::Advance, None)
    }

    /// An EPT violation of L1 itself: an on-demand page the pager provides, or the end.
    fn l1_ept_violation(&mut self, v: usize, gpa: u64, raw: &RawExit) -> ExitReply {
        if !self.layout.on_demand(gpa) {
            rt::println!(
                "vmm: guest{} vcpu{v}: L1 access to {gpa:#x} outside its memory",
                self.number
            );
            return self.end(v, Outcome::Unhandled, gpa);
        }
        if let Err(e) = pager::provide(protocol::PAGER, gpa) {
            return self.vmm_error(v, "PROVIDE for L1", e);
        }
        self.stats[protocol::R_DEMAND_FAULTS] += 1;
        resume_with_vectoring(raw)
    }

    /// RDMSR of L1: the VMX MSRs from `NestedVmx`, the rest as for any guest.
    fn l1_rdmsr(&mut self, v: usize, mut state: GuestState) -> Reply {
        self.stats[protocol::R_MSR_EXITS] += 1;
        let index = state.gprs.rcx as u32;
        let value = match self.vcpus[v].vmx.read_msr(index) {
            Some(Ok(value)) => value,
            Some(Err(fault)) => return inject(fault),
            None => match read_msr(index, &state, v as u32, self.vcpus[v].tsc_offset) {
                Some(value) => value,
                None => return inject(gp0()),
            },
        };
        state.gprs.rax = value & 0xffff_ffff;
        state.gprs.rdx = value >> 32;
        Reply::with_state(ResumeAction::Advance, StateMask::GPRS, state)
    }

    fn l1_wrmsr(&mut self, v: usize, mut state: GuestState) -> Reply {
        self.stats[protocol::R_MSR_EXITS] += 1;
        let index = state.gprs.rcx as u32;
        if let Some(fault) = self.vcpus[v].vmx.write_msr(index) {
            return inject(fault);
        }
        match write_msr(index, &mut state) {
            Some(mask) => {
                if mask.contains(StateMask::TSC) {
                    self.vcpus[v].tsc_offset = state.tsc_offset;
                }
                Reply::with_state(ResumeAction::Advance, mask, state)
            }
            None => inject(gp0()),
        }
    }

    /// MOV to CR0 or CR4 of L1 that touched a bit the VMM owns: L1 reads back what it wrote
    /// (read shadow), the real register keeps the bits VMX operation needs (the kernel adds the
    /// fixed ones). Clearing CR4.VMXE in VMX operation is #GP (SDM Vol. 3C §24.8).
    fn l1_cr_access(
        &mut self,
        v: usize,
        cr: u8,
        access: CrAccess,
        mut state: GuestState,
    ) -> Option<Reply> {
        let CrAccess::MovToCr { gpr } = access else {
            return None;
        };
        let value = state.gpr(gpr);
        let c = &mut state.controls;
        match cr {
            0 => {
                if value >> 32 != 0 {
                    return Some(inject(gp0()));
                }
                c.cr0_read_shadow = value & c.cr0_guest_host_mask;
                state.cr0 = (value & !c.cr0_guest_host_mask) | (state.cr0 & c.cr0_guest_host_mask);
            }
            4 => {
                if value & CR4_VMXE == 0 && self.vcpus[v].vmx.in_vmx_operation() {
                    return Some(inject(gp0()));
                }
                c.cr4_read_shadow = value & c.cr4_guest_host_mask;
                state.cr4 = (value & !c.cr4_guest_host_mask)
                    | (state.cr4 & c.cr4_guest_host_mask)
                    | CR4_VMXE;
            }
            _ => return None,
        }
        Some(Reply::with_state(
            ResumeAction::Advance,
            StateMask::CR.union(StateMask::CONTROLS),
            state,
        ))
    }

    /// A VMX instruction of L1: operands resolved, `NestedVmx` executes, the outcome applied.
    fn vmx_instruction(&mut self, v: usize, exit: &VmExit, msg: &ExitMessage) -> ExitReply {
        let state = msg.state;
        let fault_address = Cell::new(0);
        let paging = X86Paging {
            max_phys_bits: self.max_phys_bits,
            nxe: state.efer & EFER_NXE != 0,
            pages_1g: true,
        };
        let paging_on = state.cr0 & CR0_PG != 0;
        let write_protect = state.cr0 & CR0_WP != 0;
        let writes = matches!(
            exit,
            VmExit::VmxInstruction {
                instruction: vcpu::exit::VmxInstr::Vmptrst | vcpu::exit::VmxInstr::Vmread,
                ..
            }
        );
        let resolved = {
            let tables = L1Tables(&self.nested);
            vmx_emulation::resolve(exit, &state, |linear| {
                if !paging_on {
                    return Ok(linear);
                }
                fault_address.set(linear);
                let cpl3 = state.ss.ar & (3 << 5) != 0;
                let error = |present: bool| {
                    let code =
                        u32::from(present) | (u32::from(writes) << 1) | (u32::from(cpl3) << 2);
                    EventInfo::hardware_exception(vector::PF, Some(code))
                };
                match walk(&paging, &tables, state.cr3, linear) {
                    Ok(t) => {
                        let denied = (writes
                            && (write_protect || cpl3)
                            && !t.rights.contains(Rights::WRITE))
                            || (cpl3 && !t.rights.contains(Rights::USER));
                        if denied {
                            Err(error(true))
                        } else {
                            Ok(t.address)
                        }
                    }
                    Err(WalkError::NotPresent { .. }) => Err(error(false)),
                    Err(_) => Err(error(true)),
                }
            })
        };
        let instruction = match resolved {
            Some(Ok(instruction)) => instruction,
            Some(Err(fault)) => {
                return answer(&self.fault_reply(fault, state, fault_address.get()));
            }
            None => return self.end(v, Outcome::VmmError, Status::Inconsistent.code()),
        };
        let outcome = {
            let mut mem = L1Mem {
                nested: &mut self.nested,
            };
            self.vcpus[v].vmx.execute(&instruction, &state, &mut mem)
        };
        self.apply(v, outcome, state, Some(fault_address.get()))
    }

    /// An exception for L1 (#PF with CR2 = `address`).
    fn fault_reply(&self, fault: EventInfo, mut state: GuestState, address: u64) -> Reply {
        if fault.vector == vector::PF && fault.kind == EventType::HardwareException {
            state.cr2 = address;
            return Reply::with_state(ResumeAction::Resume, StateMask::CR, state).inject(fault, 0);
        }
        inject(fault)
    }

    /// Applies the outcome of an emulated VMX instruction to L1 (`state`: L1 at the exit).
    fn apply(
        &mut self,
        v: usize,
        outcome: VmxOutcome,
        mut state: GuestState,
        fault_address: Option<u64>,
    ) -> ExitReply {
        match outcome {
            VmxOutcome::Launch | VmxOutcome::Resume => return self.enter_l2(v),
            VmxOutcome::EntryFailed(resume) => {
                if resume.abort.is_some() {
                    return self.vmx_abort(v);
                }
                if let Err(e) = self.push_shadow(v) {
                    return self.vmm_error(v, "VcpuShadowAccess (write) of L1", e);
                }
                return answer(&resume.reply());
            }
            VmxOutcome::Inject(fault) => {
                return answer(&self.fault_reply(fault, state, fault_address.unwrap_or(0)));
            }
            VmxOutcome::InvalidateEpt(invalidation) => {
                let (kind, eptp) = match invalidation {
                    EptInvalidation::SingleContext { eptp } => (1, eptp),
                    EptInvalidation::AllContext => (2, 0),
                };
                if let Err(e) = self.nested.invept(v, kind, eptp) {
                    return self.vmm_error(v, "INVEPT of L1", nested_status(e));
                }
            }
            VmxOutcome::VmxOff => {
                if let Err(e) = self.nested.reset_vcpu(v) {
                    return self.vmm_error(v, "VMXOFF of L1", nested_status(e));
                }
            }
            VmxOutcome::InvalidateVpid(_) => {
                // L2's linear translations live under its vCPU object's own VPID: rebinding the
                // object to its EPT makes the kernel INVEPT it (single-context) at the next
                // entry, which drops every combined mapping derived from that EPT.
                if let (Some(l2), Some(ept)) = (self.vcpus[v].l2, self.vcpus[v].bound)
                    && let Err(e) = vmx::vcpu_bind(l2, ept)
                {
                    return self.vmm_error(v, "INVVPID of L1 (VcpuBind)", e);
                }
            }
            VmxOutcome::OkRead { register, value } => state.set_gpr(register, value),
            VmxOutcome::Ok | VmxOutcome::VmFailInvalid | VmxOutcome::VmFailValid(_) => {}
        }
        state.rflags = outcome.rflags(state.rflags);
        if let Err(e) = self.push_shadow(v) {
            return self.vmm_error(v, "VcpuShadowAccess (write) of L1", e);
        }
        answer(&Reply::with_state(
            ResumeAction::Advance,
            StateMask::GPRS.union(StateMask::RIP_RSP_RFLAGS),
            state,
        ))
    }

    /// L1's VMX abort (SDM Vol. 3C §28.7): that virtual CPU shuts down; the guest ends.
    fn vmx_abort(&mut self, v: usize) -> ExitReply {
        rt::println!("vmm: guest{} vcpu{v}: VMX abort", self.number);
        self.end(v, Outcome::TripleFault, v as u64)
    }

    /// VMLAUNCH/VMRESUME passed: L2's object (created or rebound on the shadow EPT for L1's
    /// EPTP) gets L2's state and runs; L1's object stops (the reply to its exit).
    fn enter_l2(&mut self, v: usize) -> ExitReply {
        let ept = match self.vcpus[v].vmx.l1_eptp() {
            Some(eptp) => match self.nested.activate(v, eptp) {
                Ok(shadow) => shadow,
                Err(e) => {
                    rt::println!(
                        "vmm: guest{} vcpu{v}: shadow EPT for EPTP {eptp:#x}: {e:?}",
                        self.number
                    );
                    return self.end(v, Outcome::VmmError, nested_status(e).code());
                }
            },
            None => self.nested.l1_ept(),
        };
        let l2 = match self.l2_object(v, ept) {
            Ok(l2) => l2,
            Err(e) => return self.vmm_error(v, "L2's vCPU object", e),
        };
        let cpu = &mut self.vcpus[v];
        let l0 = L0Requirements {
            current: cpu.l2_controls,
            primary: ProcessorBasedControls::USE_TSC_OFFSETTING,
            tsc_offset: cpu.tsc_offset,
            ..L0Requirements::default()
        };
        let Some(entry) = cpu.vmx.l2_entry(&l0) else {
            return self.end(v, Outcome::VmmError, Status::Inconsistent.code());
        };
        let reply = entry.reply(ResumeAction::Resume);
        match vmx::write_state_image(&reply, &[], &mut FastUtcb) {
            Ok(flags) => self.switch_to(v, l2, flags, true),
            Err(e) => self.vmm_error(v, "L2's state image", e),
        }
    }

    /// Answers the current exit of virtual CPU `v` with a switch to its other object
    /// `target` (`VcpuSwitch`, made by the exit loop), whose state image is in the UTCB.
    fn switch_to(&mut self, v: usize, target: Selector, flags: u64, to_l2: bool) -> ExitReply {
        self.switch = Some(Switch {
            v,
            target,
            flags,
            to_l2,
        });
        ExitReply::Written
    }

    /// The switch to L2 failed: the kernel refused L2's state (the host-isolation rules), a
    /// VM-entry failure for L1, whose exit is still to be answered.
    fn l2_state_refused(&mut self, v: usize, e: Status) -> ExitReply {
        log::warn!(
            "guest{} vcpu{v}: L2's state refused ({e:?}): VM-entry failure for L1",
            self.number
        );
        let raw = RawExit {
            reason: (1 << 31) | 33,
            ..RawExit::default()
        };
        let mut mem = L1Mem {
            nested: &mut self.nested,
        };
        match self.vcpus[v].vmx.failed_entry_exit(&raw, &mut mem) {
            Some(resume) if resume.abort.is_none() => match self.push_shadow(v) {
                Ok(()) => answer(&resume.reply()),
                Err(e) => self.vmm_error(v, "VcpuShadowAccess (write) of L1", e),
            },
            Some(_) => self.vmx_abort(v),
            None => self.end(v, Outcome::VmmError, e.code()),
        }
    }

    /// Virtual CPU `v`'s L2 object, created on `ept` or rebound to it.
    fn l2_object(&mut self, v: usize, ept: Selector) -> Result<Selector, Status> {
        if let Some(l2) = self.vcpus[v].l2 {
            if self.vcpus[v].bound != Some(ept) {
                vmx::vcpu_bind(l2, ept)?;
                self.vcpus[v].bound = Some(ept);
            }
            return Ok(l2);
        }
        let selector = slot::FIRST_L2_VCPU + v as u64;
        let badge = self.badge(self.vcpus[v].index) | L2_BADGE;
        vmx::vcpu_create(
            slot::GUEST_PD,
            selector,
            ept,
            slot::EXIT_ENDPOINT,
            vcpu_config(VCPU_PRIORITY, self.vcpus[v].cpu as u8, badge),
        )?;
        self.vcpus[v].l2 = Some(selector);
        self.vcpus[v].bound = Some(ept);
        vmx::vcpu_set_mask(
            selector,
            ALL_EXITS,
            L2_EXIT_STATE.union(StateMask::EXIT_INFO),
        )?;
        for reason in [ExitReason::EptViolation, ExitReason::EptMisconfiguration] {
            vmx::vcpu_set_mask(selector, reason as u64, StateMask::EXIT_INFO)?;
        }
        let current = vmx::vcpu_read_state(selector, StateMask::CONTROLS)?;
        self.vcpus[v].l2_controls = current.state.controls;
        Ok(selector)
    }

    // ---- Exits of L2 ----

    fn handle_l2(&mut self, v: usize, raw: &RawExit) -> ExitReply {
        if raw.reason_field().entry_failure {
            rt::println!(
                "vmm: guest{} vcpu{v}: VM entry of L2 failed (exit reason {:#x}): reflected to L1",
                self.number,
                raw.reason
            );
            let mut mem = L1Mem {
                nested: &mut self.nested,
            };
            let resume = self.vcpus[v].vmx.failed_entry_exit(raw, &mut mem);
            return self.back_to_l1(v, resume);
        }
        let exit = decode(raw);
        match exit {
            VmExit::EptViolation {
                gpa, qualification, ..
            } => {
                let fault = self.nested.l2_ept_violation(v, gpa, qualification.encode());
                return self.l2_fault(v, raw, fault);
            }
            VmExit::EptMisconfiguration { .. } => {
                return self.reflect_ept_fault(v, raw, EptFault::Misconfiguration);
            }
            _ => {}
        }
        let msg = match vmx::read_exit_message_from(&mut FastUtcb) {
            Ok(msg) => msg,
            Err(e) => return self.undecodable(v, e),
        };
        let belongs = {
            let mut mem = L1Mem {
                nested: &mut self.nested,
            };
            self.vcpus[v]
                .vmx
                .exit_belongs_to_l1(&exit, &msg.state, &mut mem)
        };
        if belongs {
            self.vcpus[v].l2_reflected += 1;
            let mut mem = L1Mem {
                nested: &mut self.nested,
            };
            let resume = self.vcpus[v].vmx.reflect_exit(raw, &msg.state, &mut mem);
            return self.back_to_l1(v, resume);
        }
        self.vcpus[v].l2_in_l0 += 1;
        self.l2_in_l0(v, &exit, msg)
    }

    /// What the shadow engine decided for an L2 EPT violation.
    fn l2_fault(&mut self, v: usize, raw: &RawExit, fault: L2Fault) -> ExitReply {
        match fault {
            L2Fault::Fixed | L2Fault::Retry => resume_with_vectoring(raw),
            L2Fault::ReflectToL1 {
                exit_reason,
                qualification,
                ..
            } => {
                let fault = if exit_reason == crate::shadow::EXIT_EPT_MISCONFIGURATION {
                    EptFault::Misconfiguration
                } else {
                    EptFault::Violation(EptViolationQualification::decode(qualification))
                };
                self.reflect_ept_fault(v, raw, fault)
            }
            L2Fault::PassedToL0Then(inner) => self.l2_fault(v, raw, *inner),
            L2Fault::Failed(e) => {
                rt::println!(
                    "vmm: guest{} vcpu{v}: L2 EPT violation at {:#x}: {e:?}",
                    self.number,
                    raw.guest_physical_address
                );
                self.end(v, Outcome::VmmError, nested_status(e).code())
            }
        }
    }

    /// Reflects an EPT fault of L2 into L1 (L2's state read from its object first).
    fn reflect_ept_fault(&mut self, v: usize, raw: &RawExit, fault: EptFault) -> ExitReply {
        let Some(l2) = self.vcpus[v].l2 else {
            return self.end(v, Outcome::VmmError, Status::Inconsistent.code());
        };
        let state = match vmx::vcpu_read_state(l2, L2_EXIT_STATE) {
            Ok(msg) => msg.state,
            Err(e) => return self.vmm_error(v, "VcpuReadState of L2", e),
        };
        self.vcpus[v].l2_reflected += 1;
        let mut mem = L1Mem {
            nested: &mut self.nested,
        };
        let resume = self.vcpus[v]
            .vmx
            .reflect_ept_fault(fault, raw, &state, &mut mem);
        self.back_to_l1(v, resume)
    }

    /// Switches virtual CPU `v` from L2 to L1: L1's new state into its object, which runs;
    /// L2's object stops (the reply to its exit).
    fn back_to_l1(&mut self, v: usize, resume: Option<L1Resume>) -> ExitReply {
        let Some(resume) = resume else {
            return self.end(v, Outcome::VmmError, Status::Inconsistent.code());
        };
        if resume.abort.is_some() {
            return self.vmx_abort(v);
        }
        // The shadow fields the exit changed go with L1's state, in the same call.
        let (pairs, n) = match self.shadow_delta(v) {
            Some(delta) => delta,
            None => {
                if let Err(e) = self.push_shadow(v) {
                    return self.vmm_error(v, "VcpuShadowAccess (write) of L1", e);
                }
                ([(VmcsField::GUEST_RIP, 0); SHADOW_FIELDS_MAX], 0)
            }
        };
        let l1 = self.vcpus[v].l1;
        let reply = resume.reply();
        match vmx::write_state_image(&reply, &pairs[..n], &mut FastUtcb) {
            Ok(flags) => {
                // A failed switch ends the guest, so the shadow holds these from now on.
                self.shadow_took(v, &pairs[..n]);
                self.switch_to(v, l1, flags, false)
            }
            Err(e) => self.vmm_error(v, "L1's state image", e),
        }
    }

    /// An exit of L2 that L1 did not ask for: L0 handles it for L2 as for any guest.
    fn l2_in_l0(&mut self, v: usize, exit: &VmExit, msg: ExitMessage) -> ExitReply {
        let mut state = msg.state;
        let reply = match *exit {
            VmExit::ExceptionOrNmi {
                vector: vector @ (vector::DB | vector::AC),
                kind: EventType::HardwareException,
                error_code,
                ..
            } => inject(EventInfo::hardware_exception(vector, error_code)),
            VmExit::IoInstruction {
                port,
                size,
                direction,
                string: None,
                ..
            } => {
                if direction == IoDirection::In {
                    let mask = match size {
                        1 => 0xff,
                        2 => 0xffff,
                        _ => 0xffff_ffff,
                    };
                    let value = u64::from(devices::port_in(port, size));
                    state.gprs.rax = if size == 4 {
                        value
                    } else {
                        (state.gprs.rax & !mask) | (value & mask)
                    };
                }
                Reply::with_state(ResumeAction::Advance, StateMask::GPRS, state)
            }
            VmExit::Rdmsr => {
                match read_msr(
                    state.gprs.rcx as u32,
                    &state,
                    v as u32,
                    self.vcpus[v].tsc_offset,
                ) {
                    Some(value) => {
                        state.gprs.rax = value & 0xffff_ffff;
                        state.gprs.rdx = value >> 32;
                        Reply::with_state(ResumeAction::Advance, StateMask::GPRS, state)
                    }
                    None => inject(gp0()),
                }
            }
            VmExit::Wrmsr => match write_msr(state.gprs.rcx as u32, &mut state) {
                // L2's TSC offset is L1's (TSC offsetting is not offered to L1).
                Some(mask) if !mask.contains(StateMask::TSC) => {
                    Reply::with_state(ResumeAction::Advance, mask, state)
                }
                _ => inject(gp0()),
            },
            VmExit::TripleFault => {
                rt::println!("vmm: guest{} vcpu{v}: L2 triple fault", self.number);
                return self.end(v, Outcome::TripleFault, v as u64);
            }
            ref other => {
                rt::println!(
                    "vmm: guest{} vcpu{v}: unhandled L2 exit {other:?} at rip {:#x}",
                    self.number,
                    msg.state.rip
                );
                let detail = ((v as u64) << 32) | u64::from(msg.exit.reason & 0xffff);
                return self.end(v, Outcome::Unhandled, detail);
            }
        };
        answer(&reply)
    }

    // ---- End ----

    fn report(&mut self) -> Report {
        let (outcome, detail) = self.outcome.unwrap_or((Outcome::Pass, 0));
        let mut extra = alloc::vec![0u64; protocol::NESTED_REPORT_WORDS];
        extra[..protocol::REPORT_WORDS].copy_from_slice(&self.stats);
        extra[protocol::R_GUEST_CPUID] = u64::MAX;
        extra[protocol::R_GUEST_EPT_FAULT] = u64::MAX;
        extra[protocol::R_VMM_CPUID] = u64::MAX;
        extra[protocol::R_VMM_EPT_FAULT] = u64::MAX;
        extra[protocol::R_VMM_EPT_MAP] = u64::MAX;
        for i in 0..protocol::NESTED_RESULTS {
            extra[protocol::nested_result_word(i)] =
                self.results.get(i).copied().unwrap_or(u64::MAX);
        }
        for (v, cpu) in self
            .vcpus
            .iter()
            .enumerate()
            .take(protocol::NESTED_MAX_VCPUS)
        {
            let c = self.nested.counters(v);
            let word = |counter| protocol::nested_vcpu_word(v, counter);
            extra[word(protocol::N_FIXED)] = c.fixed_in_vept;
            extra[word(protocol::N_REFLECTED)] = c.reflected_to_l1;
            extra[word(protocol::N_PAGER)] = c.passed_to_l0;
            extra[word(protocol::N_MISCONFIGURATIONS)] = c.reflected_misconfigurations;
            extra[word(protocol::N_SHADOW_FAULTS)] = c.shadow_faults();
            extra[word(protocol::N_L2_EXITS_REFLECTED)] = cpu.l2_reflected;
            extra[word(protocol::N_L1_VMX_EXITS)] = cpu.l1_vmx_exits;
            extra[word(protocol::N_L2_EXITS_L0)] = cpu.l2_in_l0;
            log::info!(
                "guest{} vcpu{v}: {c:?}; L2 exits reflected {}, L1 VMX exits {}, L2 exits in L0 {}",
                self.number,
                cpu.l2_reflected,
                cpu.l1_vmx_exits,
                cpu.l2_in_l0
            );
        }
        log::info!(
            "guest{}: shadow backend {:?}",
            self.number,
            self.nested.backend_stats()
        );
        Report {
            words: [self.number, outcome as u64, detail, 0],
            extra,
        }
    }

    /// Deletes the vCPU objects, the shadows and L1's EPT copy; a failure becomes the outcome
    /// if the guest had none worse.
    pub fn teardown(mut self, mut report: Report) -> Report {
        if let Err(e) = self.dismantle()
            && report.words[1] == Outcome::Pass as u64
        {
            report.words[1] = Outcome::VmmError as u64;
            report.words[2] = e.code();
        }
        report
    }

    fn dismantle(&mut self) -> Result<(), Status> {
        let mut result = Ok(());
        let mut delete = |selector: Selector, what: &str| match sys::cap_delete(selector) {
            Ok(_) | Err(Status::EmptySlot) => {}
            Err(e) => {
                log::error!("CapDelete of {what} ({selector}): {e:?}");
                result = Err(e);
            }
        };
        for cpu in self.vcpus.drain(..) {
            delete(cpu.l1, "an L1 vCPU");
            if let Some(l2) = cpu.l2 {
                delete(l2, "an L2 vCPU");
            }
        }
        if self.pd_created {
            self.pd_created = false;
            delete(slot::GUEST_PD, "the guest's PD");
        }
        for selector in slot::SHADOWS {
            delete(selector, "a shadow EPT or pool piece");
        }
        delete(slot::SHADOW_PIECE, "the shadow pool");
        delete(slot::L1_EPT, "L1's EPT");
        result
    }
}

/// Writes `reply` for the answer to the current exit.
/// The vCPU calls this VMM relies on refuse flags docs/abi.md does not define.
fn check_flag_arguments(vcpu: Selector) -> Result<(), Status> {
    let endpoint = slot::EXIT_ENDPOINT;
    for (what, call, args, expected) in [
        (
            "VcpuWriteState with flags 4",
            abi::Syscall::VcpuWriteState,
            [vcpu, 4, 0],
            Status::InvalidArgument,
        ),
        (
            "VcpuShadowVmcs with a1 = 2",
            abi::Syscall::VcpuShadowVmcs,
            [vcpu, 2, 0],
            Status::InvalidArgument,
        ),
        (
            "VcpuSwitch with flags 1",
            abi::Syscall::VcpuSwitch,
            [endpoint, vcpu, 1],
            Status::InvalidArgument,
        ),
        (
            "VcpuSwitch with no exit to answer",
            abi::Syscall::VcpuSwitch,
            [endpoint, vcpu, 0],
            Status::NoCaller,
        ),
    ] {
        let [a0, a1, a2] = args;
        let got = sys::status_of(sys::raw_syscall(call as u64, [a0, a1, a2, 0, 0, 0]).status);
        if got != expected {
            rt::println!("vmm: {what}: {got:?}, expected {expected:?}");
            return Err(Status::Inconsistent);
        }
    }
    Ok(())
}

fn answer(reply: &Reply) -> ExitReply {
    vmx::write_reply_to(&mut FastUtcb, reply)
}

/// A reply that injects `event` (RIP stays at the instruction).
fn inject(event: EventInfo) -> Reply {
    Reply::new(ResumeAction::Resume).inject(event, 0)
}

const fn gp0() -> EventInfo {
    EventInfo::hardware_exception(vector::GP, Some(0))
}

/// Resume, delivering again the event an exit interrupted (SDM Vol. 3C §28.2.4).
fn resume_with_vectoring(raw: &RawExit) -> ExitReply {
    match raw.idt_vectoring() {
        Some(event) => {
            let length = if event.kind.uses_instruction_length() {
                raw.instruction_length
            } else {
                0
            };
            answer(&Reply::new(ResumeAction::Resume).inject(event, length))
        }
        None => ExitReply::Resume,
    }
}

/// RDMSR of the MSRs every guest of this VMM has (`None`: #GP).
fn read_msr(index: u32, state: &GuestState, vcpu: u32, tsc_offset: u64) -> Option<u64> {
    Some(match index {
        msr::IA32_EFER => state.efer,
        msr::IA32_PAT => state.pat,
        msr::IA32_TIME_STAMP_COUNTER => rt::rdtsc().wrapping_add(tsc_offset),
        msr::IA32_APIC_BASE => devices::apic_base(vcpu),
        msr::IA32_MTRRCAP => 0,
        msr::IA32_FS_BASE => state.fs.base,
        msr::IA32_GS_BASE => state.gs.base,
        msr::IA32_KERNEL_GS_BASE => state.kernel_gs_base,
        _ => return None,
    })
}

/// WRMSR of those MSRs: the groups changed (`None`: #GP).
fn write_msr(index: u32, state: &mut GuestState) -> Option<StateMask> {
    let value = (state.gprs.rdx << 32) | (state.gprs.rax & 0xffff_ffff);
    let canonical = (((value << 16) as i64) >> 16) as u64 == value;
    Some(match index {
        msr::IA32_EFER if devices::efer_write_allowed(state.efer, value) => {
            state.efer = value;
            StateMask::EFER_PAT
        }
        msr::IA32_PAT if devices::pat_valid(value) => {
            state.pat = value;
            StateMask::EFER_PAT
        }
        msr::IA32_TIME_STAMP_COUNTER => {
            state.tsc_offset = value.wrapping_sub(rt::rdtsc());
            StateMask::TSC
        }
        msr::IA32_FS_BASE if canonical => {
            state.fs.base = value;
            StateMask::SEGMENTS
        }
        msr::IA32_GS_BASE if canonical => {
            state.gs.base = value;
            StateMask::SEGMENTS
        }
        msr::IA32_KERNEL_GS_BASE if canonical => {
            state.kernel_gs_base = value;
            StateMask::SYSCALL_MSRS
        }
        _ => return None,
    })
}
