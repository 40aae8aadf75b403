//! The compact 64-bit key encoding shared by the kernel and `ept` for derivation-tree nodes.
//!
//! Bit layout of a packed key (bit 63 is the most significant):
//!
//! | kind         | 63:62 tag | 61:60      | 59:40            | 39:32        | 31:0         |
//! |--------------|-----------|------------|------------------|--------------|--------------|
//! | `Capability` | `00`      | 0          | space (20 bits)  | 0            | slot         |
//! | `Mapping`    | `01`      | level      | space (20 bits)  | page 39:32   | page 31:0    |
//! | `Object`     | `10`      | 0          | 0                | kind         | index        |
//!
//! Tag `11` is reserved. Limits: space ids below 2^20 ([`NodeKey::MAX_SPACE`]); page numbers
//! below 2^40 ([`NodeKey::MAX_PAGE`]), i.e. addresses below 2^52, the architectural maximum
//! physical-address width (Intel SDM Vol. 3A §4.1.4, MAXPHYADDR ≤ 52); levels 0..=3
//! (0 = 4 KiB, 1 = 2 MiB, 2 = 1 GiB, 3 = 512 GiB). `pack` refuses values that do not fit
//! instead of truncating, and `unpack` refuses reserved tags and nonzero reserved bits, so
//! `unpack(pack(k)) == Ok(k)` and every accepted `u64` is the packing of exactly one key.

/// A decoded derivation-tree key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum NodeKey {
    /// A capability held in slot `slot` of capability space `space`.
    Capability {
        /// Capability-space id (below 2^20).
        space: u32,
        /// Slot index (selector) in that space.
        slot: u32,
    },
    /// A mapping of page number `page` (address >> 12, below 2^40) at paging level `level`
    /// (0 = 4 KiB, 1 = 2 MiB, 2 = 1 GiB, 3 = 512 GiB) in memory space `space` (below 2^20).
    Mapping {
        /// Memory-space (EPT / address space) id.
        space: u32,
        /// Page number: address >> 12. Alignment to the level is the caller's business.
        page: u64,
        /// Paging level of the mapping.
        level: u8,
    },
    /// A kernel object, by object kind code and index.
    Object {
        /// Object kind code (see `ObjectKind::code`).
        kind: u8,
        /// Object index.
        index: u32,
    },
}

/// Why a [`NodeKey`] cannot be packed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum KeyError {
    /// The space id is 2^20 or more.
    SpaceTooLarge,
    /// The page number is 2^40 or more.
    PageTooLarge,
    /// The level is above 3.
    LevelTooLarge,
}

const TAG_SHIFT: u32 = 62;
const LEVEL_SHIFT: u32 = 60;
const SPACE_SHIFT: u32 = 40;
const KIND_SHIFT: u32 = 32;
const TAG_CAPABILITY: u64 = 0;
const TAG_MAPPING: u64 = 1;
const TAG_OBJECT: u64 = 2;
const SPACE_MASK: u64 = (1 << NodeKey::SPACE_BITS) - 1;
const PAGE_MASK: u64 = (1 << NodeKey::PAGE_BITS) - 1;

impl NodeKey {
    /// Width of a space id.
    pub const SPACE_BITS: u32 = 20;
    /// Width of a page number.
    pub const PAGE_BITS: u32 = 40;
    /// Largest space id that fits.
    pub const MAX_SPACE: u32 = (1 << Self::SPACE_BITS) - 1;
    /// Largest page number that fits.
    pub const MAX_PAGE: u64 = (1 << Self::PAGE_BITS) - 1;
    /// Largest paging level that fits.
    pub const MAX_LEVEL: u8 = 3;

    /// Encodes the key into 64 bits, or says which field does not fit.
    pub const fn pack(self) -> Result<u64, KeyError> {
        match self {
            Self::Capability { space, slot } => {
                if space > Self::MAX_SPACE {
                    return Err(KeyError::SpaceTooLarge);
                }
                Ok((TAG_CAPABILITY << TAG_SHIFT) | ((space as u64) << SPACE_SHIFT) | slot as u64)
            }
            Self::Mapping { space, page, level } => {
                if space > Self::MAX_SPACE {
                    return Err(KeyError::SpaceTooLarge);
                }
                if page > Self::MAX_PAGE {
                    return Err(KeyError::PageTooLarge);
                }
                if level > Self::MAX_LEVEL {
                    return Err(KeyError::LevelTooLarge);
                }
                Ok((TAG_MAPPING << TAG_SHIFT)
                    | ((level as u64) << LEVEL_SHIFT)
                    | ((space as u64) << SPACE_SHIFT)
                    | page)
            }
            Self::Object { kind, index } => {
                Ok((TAG_OBJECT << TAG_SHIFT) | ((kind as u64) << KIND_SHIFT) | index as u64)
            }
        }
    }

    /// Decodes a packed key; `None` for the reserved tag or nonzero reserved bits.
    pub const fn unpack(raw: u64) -> Option<Self> {
        let space = ((raw >> SPACE_SHIFT) & SPACE_MASK) as u32;
        let level = ((raw >> LEVEL_SHIFT) & 0b11) as u8;
        match raw >> TAG_SHIFT {
            TAG_CAPABILITY => {
                if level != 0 || (raw >> KIND_SHIFT) & 0xff != 0 {
                    return None;
                }
                Some(Self::Capability {
                    space,
                    slot: raw as u32,
                })
            }
            TAG_MAPPING => Some(Self::Mapping {
                space,
                page: raw & PAGE_MASK,
                level,
            }),
            TAG_OBJECT => {
                if level != 0 || space != 0 {
                    return None;
                }
                Some(Self::Object {
                    kind: (raw >> KIND_SHIFT) as u8,
                    index: raw as u32,
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pack_refuses_space_beyond_20_bits() {
        let cap = NodeKey::Capability {
            space: NodeKey::MAX_SPACE + 1,
            slot: 0,
        };
        assert_eq!(cap.pack(), Err(KeyError::SpaceTooLarge));
        let map = NodeKey::Mapping {
            space: 1 << 20,
            page: 0,
            level: 0,
        };
        assert_eq!(map.pack(), Err(KeyError::SpaceTooLarge));
    }

    #[test]
    fn pack_refuses_page_beyond_40_bits() {
        let map = NodeKey::Mapping {
            space: 0,
            page: 1 << 40,
            level: 0,
        };
        assert_eq!(map.pack(), Err(KeyError::PageTooLarge));
    }

    #[test]
    fn pack_refuses_level_above_3() {
        let map = NodeKey::Mapping {
            space: 0,
            page: 0,
            level: 4,
        };
        assert_eq!(map.pack(), Err(KeyError::LevelTooLarge));
    }

    #[test]
    fn limits_pack_exactly() {
        let map = NodeKey::Mapping {
            space: NodeKey::MAX_SPACE,
            page: NodeKey::MAX_PAGE,
            level: 3,
        };
        assert_eq!(map.pack(), Ok(0x7fff_ffff_ffff_ffff));
        let cap = NodeKey::Capability {
            space: NodeKey::MAX_SPACE,
            slot: u32::MAX,
        };
        assert_eq!(cap.pack(), Ok(0x0fff_ff00_ffff_ffff));
        let obj = NodeKey::Object {
            kind: 0xab,
            index: 0x1234_5678,
        };
        assert_eq!(obj.pack(), Ok(0x8000_00ab_1234_5678));
    }

    #[test]
    fn unpack_refuses_reserved_tag_and_bits() {
        assert_eq!(NodeKey::unpack(0xc000_0000_0000_0000), None);
        assert_eq!(NodeKey::unpack(1 << 60), None); // capability with a level
        assert_eq!(NodeKey::unpack(1 << 32), None); // capability with bits 39:32
        assert_eq!(NodeKey::unpack((2 << 62) | (1 << 40)), None); // object with a space
        assert_eq!(NodeKey::unpack((2 << 62) | (1 << 61)), None); // object with a level
    }

    fn any_key() -> impl Strategy<Value = NodeKey> {
        prop_oneof![
            (0..=NodeKey::MAX_SPACE, any::<u32>())
                .prop_map(|(space, slot)| NodeKey::Capability { space, slot }),
            (
                0..=NodeKey::MAX_SPACE,
                0..=NodeKey::MAX_PAGE,
                0..=NodeKey::MAX_LEVEL
            )
                .prop_map(|(space, page, level)| NodeKey::Mapping {
                    space,
                    page,
                    level
                }),
            (any::<u8>(), any::<u32>()).prop_map(|(kind, index)| NodeKey::Object { kind, index }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn unpack_inverts_pack(key in any_key()) {
            let raw = key.pack().unwrap();
            prop_assert_eq!(NodeKey::unpack(raw), Some(key));
        }

        #[test]
        fn every_accepted_raw_value_repacks_to_itself(raw in any::<u64>()) {
            if let Some(key) = NodeKey::unpack(raw) {
                prop_assert_eq!(key.pack(), Ok(raw));
            }
        }

        #[test]
        fn distinct_keys_pack_distinctly(a in any_key(), b in any_key()) {
            prop_assert_eq!(a == b, a.pack().unwrap() == b.pack().unwrap());
        }
    }
}
