//! # tch-detloss
//!
//! MMDetection's loss pipeline for [tch](https://github.com/LaurentMazare/tch-rs): sampling,
//! element losses, element weights, the reduction with `avg_factor` and `loss_weight`, with
//! MMDetection 3.3's semantics and config dicts, computed by fused kernels (one pass forward, one
//! pass backward, on the CPU and on CUDA) behind real autograd nodes.
//!
//! ```
//! use tch::{Device, Kind, Tensor};
//! use tch_detloss::{registry, LossArgs};
//!
//! let loss = registry::build_str(r#"{"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0}"#)?;
//! let pred = Tensor::randn([100, 80], (Kind::Float, Device::Cpu)).set_requires_grad(true);
//! let labels = Tensor::randint(81, [100], (Kind::Int64, Device::Cpu)); // 80 = background
//! let label_weights = Tensor::ones([100], (Kind::Float, Device::Cpu));
//! let l = loss.forward(&pred, (&labels).into(), &LossArgs::new().weight(&label_weights).avg_factor(12.0))?;
//! l.backward();
//! # anyhow::Ok(())
//! ```
//!
//! Layout: [`losses`] holds one module per MMDetection loss; [`reduction`] the shared weighting
//! and reduction; [`registry`] the config-dict builders; [`autograd`] the custom-function bridge;
//! [`task_modules`] the anchor generator, box coder, assigners and samplers; [`dense_heads`] the
//! training targets of anchor-based heads; [`dist`] data-parallel training on libtorch's c10d
//! (process groups, `reduce_mean`, DistributedDataParallel).
#![warn(missing_docs)]

mod abi;
pub mod autograd;
mod bodies;
mod checks;
pub mod cuda;
pub mod dense_heads;
pub mod dist;
mod emu;
mod fused;
#[doc(hidden)]
pub mod golden;
mod host;
mod launch;
mod loss;
pub mod losses;
pub mod profiler;
mod ptxas;
pub mod reduction;
pub mod registry;
pub mod task_modules;

pub use host::cpu_isa;
pub use loss::{Loss, LossArgs, Target};
pub use reduction::{AvgFactor, Reduction};

/// Helpers for this crate's own tests; not part of the API.
#[doc(hidden)]
pub mod testing {
    pub use crate::checks::meta_like;
    pub use crate::emu::{
        built as emulated_device_built, kernel_names as emulated_kernel_names,
        with_emulated_device, EmulatedDevice,
    };

    /// Every CUDA entry point the launch plan can name.
    pub fn planned_kernel_names() -> Vec<String> {
        crate::launch::all_kernel_names()
    }
}
