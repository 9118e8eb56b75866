//! Network-namespace lab (being written).
