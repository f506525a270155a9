//! NVMe/TCP transport (being written).
