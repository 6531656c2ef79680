//! Helpers of `benches/relay.rs`: the topology and settings (`topo`), the load generators
//! (`loadgen`), what is read from /proc and the statistics (`measure`), the table (`table`).
//! Run with `cargo bench --bench relay` as root.

pub mod loadgen;
pub mod measure;
pub mod table;
pub mod topo;
