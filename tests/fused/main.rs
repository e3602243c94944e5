//! The fused kernels, by concern: each family against its unfused stock-op composition over
//! every dtype, shape, layout, weight and reduction (`matrix`); what is particular to the focal
//! family, to the classification losses on the row and histogram executors and to the box
//! losses; bitwise
//! determinism; the compiled CUDA kernels; the device executor on the emulated device; and, behind
//! the `gpu-tests` feature, on a GPU.

#[macro_use]
mod common;
mod bad_inputs;
mod boxes;
mod classification;

mod determinism;
mod emulated;
mod focal;
#[cfg(feature = "gpu-tests")]
mod gpu;
mod kernels_built;
mod matrix;
