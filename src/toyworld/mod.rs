//! The synthetic toy world (being written).
