//! Typed ids and units shared by every layer (STYLE habit 4): a number's meaning is in its type.

use std::fmt;

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident($inner:ty)) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

id_type!(
    /// A logical CPU number as the kernel counts it (the index used by `sched_setaffinity`).
    CoreId(usize)
);
id_type!(
    /// A logical block address, in units of the bdev's block size.
    Lba(u64)
);
id_type!(
    /// An NVMe namespace id (1-based; 0 and 0xffff_ffff are reserved by the spec).
    Nsid(u32)
);
id_type!(
    /// An NVMe command identifier, unique among a queue's outstanding commands.
    Cid(u16)
);
id_type!(
    /// An NVMe queue id; 0 is the admin queue.
    QueueId(u16)
);
