//! (being written: see the engine-foundation issue)
