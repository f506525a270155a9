//! Engine tools (being written).
