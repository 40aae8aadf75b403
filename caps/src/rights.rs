//! Rights: one bitflags type per object kind, stored as raw `u32` bits in a capability.
//!
//! Bits are only meaningful together with the object kind; the same bit means different things
//! for different kinds. Delegation can only clear bits, never set them.

use bitflags::bitflags;

bitflags! {
    /// Rights on a protection domain: which kernel objects may be created inside it.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    pub struct ProtectionDomainRights: u32 {
        /// Create a child protection domain.
        const CREATE_DOMAIN = 1 << 0;
        /// Create a thread in the domain.
        const CREATE_THREAD = 1 << 1;
        /// Create an IPC endpoint (portal).
        const CREATE_ENDPOINT = 1 << 2;
        /// Create a notification (semaphore).
        const CREATE_NOTIFICATION = 1 << 3;
        /// Create a virtual CPU.
        const CREATE_VCPU = 1 << 4;
        /// Create an EPT (guest-physical memory space).
        const CREATE_EPT = 1 << 5;
    }
}

bitflags! {
    /// Rights on a thread.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    pub struct ThreadRights: u32 {
        /// Start, stop and read/write the thread's register state.
        const CONTROL = 1 << 0;
        /// Move the thread to another CPU.
        const SET_AFFINITY = 1 << 1;
        /// Change the thread's scheduling priority.
        const SET_PRIORITY = 1 << 2;
    }
}

bitflags! {
    /// Rights on an IPC endpoint (portal: call and reply).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    pub struct EndpointRights: u32 {
        /// Call the endpoint and wait for the reply.
        const CALL = 1 << 0;
        /// Receive calls on the endpoint (be its server).
        const RECEIVE = 1 << 1;
        /// Transfer capabilities in messages sent through the endpoint.
        const GRANT = 1 << 2;
    }
}

bitflags! {
    /// Rights on a notification (counting semaphore).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    pub struct NotificationRights: u32 {
        /// Signal (up).
        const SIGNAL = 1 << 0;
        /// Wait (down).
        const WAIT = 1 << 1;
    }
}

bitflags! {
    /// Rights on memory (4 KiB, 2 MiB or 1 GiB frames).
    ///
    /// `READ`, `WRITE` and `EXECUTE` sit at the bit positions of the read, write and execute
    /// permissions of an EPT paging-structure entry, bits 0-2 (Intel SDM Vol. 3C §29.3.2), so a
    /// mapping's permissions are `rights.bits() & 0b111`.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    pub struct MemoryRights: u32 {
        /// Read access through mappings.
        const READ = 1 << 0;
        /// Write access through mappings.
        const WRITE = 1 << 1;
        /// Instruction fetch through mappings.
        const EXECUTE = 1 << 2;
        /// Map the memory into an address space or EPT.
        const MAP = 1 << 3;
        /// Delegate the memory onward (map it into another domain's space).
        const DELEGATE = 1 << 4;
    }
}

bitflags! {
    /// Rights on a virtual CPU.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    pub struct VcpuRights: u32 {
        /// Enter the guest on this vCPU.
        const RUN = 1 << 0;
        /// Read guest register and VMCS state.
        const READ_STATE = 1 << 1;
        /// Write guest register and VMCS state.
        const WRITE_STATE = 1 << 2;
        /// Force a running vCPU out to its VMM (recall).
        const RECALL = 1 << 3;
        /// Bind the vCPU to an EPT and to the endpoint that receives its exits.
        const BIND = 1 << 4;
    }
}

bitflags! {
    /// Rights on an EPT (a guest-physical memory space).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    pub struct EptRights: u32 {
        /// Map memory into this EPT.
        const MAP = 1 << 0;
        /// Unmap memory from this EPT.
        const UNMAP = 1 << 1;
        /// Use this EPT's mappings as the source of mappings into another EPT.
        const MAP_SOURCE = 1 << 2;
        /// Invalidate cached translations for this EPT (INVEPT).
        const INVALIDATE = 1 << 3;
    }
}

bitflags! {
    /// Rights on a range of I/O ports.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    pub struct IoPortRights: u32 {
        /// Let a protection domain's threads access the ports (IN/OUT in ring 3).
        const USE = 1 << 0;
        /// Split off a sub-range as a new capability.
        const DELEGATE = 1 << 1;
    }
}

bitflags! {
    /// Rights on a range of interrupt lines.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    pub struct InterruptRights: u32 {
        /// Route a line to a notification, and acknowledge it.
        const BIND = 1 << 0;
    }
}
