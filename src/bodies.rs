//! The kernel bodies of `kernels/losses.def`, the one list of fused losses: the `Body` enum and
//! the CPU executor's entry points, generated from that list by build.rs.
include!(concat!(env!("OUT_DIR"), "/losses.rs"));
