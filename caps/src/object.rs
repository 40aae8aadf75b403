//! Object kinds, typed capability handles `Cap<T>` and the one rights-and-kind check.

use crate::derivation::NodeId;
use crate::error::CapError;
use crate::rights::{
    EndpointRights, EptRights, InterruptRights, IoPortRights, MemoryRights, NotificationRights,
    ProtectionDomainRights, ThreadRights, VcpuRights,
};
use bitflags::Flags;
use core::fmt;

/// The kinds of kernel object a capability can name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
#[repr(u8)]
pub enum ObjectKind {
    /// A protection domain: owns a capability space and address spaces.
    ProtectionDomain = 1,
    /// A thread (execution context).
    Thread = 2,
    /// An IPC endpoint (portal: call and reply).
    Endpoint = 3,
    /// A notification (counting semaphore).
    Notification = 4,
    /// Memory: 4 KiB, 2 MiB or 1 GiB frames.
    Memory = 5,
    /// A virtual CPU.
    Vcpu = 6,
    /// An EPT: a guest-physical memory space.
    Ept = 7,
    /// A range of I/O ports.
    IoPorts = 8,
    /// A range of interrupt lines (global system interrupts).
    Interrupts = 9,
}

impl ObjectKind {
    /// Every kind, in code order.
    pub const ALL: [ObjectKind; 9] = [
        Self::ProtectionDomain,
        Self::Thread,
        Self::Endpoint,
        Self::Notification,
        Self::Memory,
        Self::Vcpu,
        Self::Ept,
        Self::IoPorts,
        Self::Interrupts,
    ];

    /// Stable numeric code (also the `kind` of `NodeKey::Object`); 0 is never a kind.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The kind with code `code`, if any.
    pub const fn from_code(code: u8) -> Option<Self> {
        let index = code.wrapping_sub(1) as usize;
        if index < Self::ALL.len() {
            Some(Self::ALL[index])
        } else {
            None
        }
    }

    /// Every rights bit defined for this kind.
    pub const fn valid_rights(self) -> u32 {
        match self {
            Self::ProtectionDomain => ProtectionDomainRights::all().bits(),
            Self::Thread => ThreadRights::all().bits(),
            Self::Endpoint => EndpointRights::all().bits(),
            Self::Notification => NotificationRights::all().bits(),
            Self::Memory => MemoryRights::all().bits(),
            Self::Vcpu => VcpuRights::all().bits(),
            Self::Ept => EptRights::all().bits(),
            Self::IoPorts => IoPortRights::all().bits(),
            Self::Interrupts => InterruptRights::all().bits(),
        }
    }
}

/// A kind of object at the type level: ties a marker type to its kind and rights type.
pub trait ObjectType {
    /// The kind of object.
    const KIND: ObjectKind;
    /// The rights bitflags for this kind.
    type Rights: Flags<Bits = u32> + Copy + Eq + fmt::Debug;
}

macro_rules! object_types {
    ($($(#[$doc:meta])* $name:ident => $rights:ty;)*) => {$(
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        pub enum $name {}

        impl ObjectType for $name {
            const KIND: ObjectKind = ObjectKind::$name;
            type Rights = $rights;
        }
    )*};
}

object_types! {
    /// Marker for protection-domain capabilities.
    ProtectionDomain => ProtectionDomainRights;
    /// Marker for thread capabilities.
    Thread => ThreadRights;
    /// Marker for endpoint capabilities.
    Endpoint => EndpointRights;
    /// Marker for notification capabilities.
    Notification => NotificationRights;
    /// Marker for memory capabilities.
    Memory => MemoryRights;
    /// Marker for vCPU capabilities.
    Vcpu => VcpuRights;
    /// Marker for EPT capabilities.
    Ept => EptRights;
    /// Marker for I/O-port capabilities.
    IoPorts => IoPortRights;
    /// Marker for interrupt capabilities.
    Interrupts => InterruptRights;
}

/// A validated, typed capability: an object of kind `T` and the rights held on it.
///
/// Only [`Capability::check`] makes one (through `CapSystem::lookup`), so holding a `Cap<T>`
/// means the kind and the required rights were checked.
pub struct Cap<T: ObjectType> {
    object: u32,
    rights: T::Rights,
}

impl<T: ObjectType> Cap<T> {
    /// Index of the object in the kernel's table for kind `T`.
    pub fn object(&self) -> u32 {
        self.object
    }

    /// All rights the capability carries (at least the ones checked).
    pub fn rights(&self) -> T::Rights {
        self.rights
    }
}

impl<T: ObjectType> Clone for Cap<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T: ObjectType> Copy for Cap<T> {}

impl<T: ObjectType> PartialEq for Cap<T> {
    fn eq(&self, other: &Self) -> bool {
        self.object == other.object && self.rights == other.rights
    }
}

impl<T: ObjectType> Eq for Cap<T> {}

impl<T: ObjectType> fmt::Debug for Cap<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cap")
            .field("kind", &T::KIND)
            .field("object", &self.object)
            .field("rights", &self.rights)
            .finish()
    }
}

/// A capability as stored in a slot: kind, object, raw rights bits and its derivation node.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Capability {
    kind: ObjectKind,
    object: u32,
    rights: u32,
    node: NodeId,
}

impl Capability {
    pub(crate) fn new(kind: ObjectKind, object: u32, rights: u32, node: NodeId) -> Self {
        Self {
            kind,
            object,
            rights,
            node,
        }
    }

    /// The kind of object named.
    pub fn kind(&self) -> ObjectKind {
        self.kind
    }

    /// Index of the object in the kernel's table for its kind.
    pub fn object(&self) -> u32 {
        self.object
    }

    /// Raw rights bits (interpret with the kind's rights type).
    pub fn rights(&self) -> u32 {
        self.rights
    }

    /// The capability's node in the derivation tree.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The one validation of kind and rights: a `Cap<T>` if this capability names a `T` and
    /// carries every right in `required`.
    pub fn check<T: ObjectType>(&self, required: T::Rights) -> Result<Cap<T>, CapError> {
        if self.kind != T::KIND {
            return Err(CapError::WrongType);
        }
        let required = required.bits();
        if self.rights & required != required {
            return Err(CapError::InsufficientRights);
        }
        Ok(Cap {
            object: self.object,
            rights: T::Rights::from_bits_truncate(self.rights),
        })
    }
}
