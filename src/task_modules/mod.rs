//! MMDetection's task modules (`mmdet/models/task_modules/`): the anchor and point generators,
//! the box coders, assigners and samplers, each built from the config dict an MMDetection user writes,
//! batched over images and free of host reads where MMDetection's semantics allow.
//!
//! [`build`] is the registry: it maps a config's `type` to the module.
//!
//! ```
//! use tch_detloss::task_modules::{build, TaskModule};
//! let m = build(&serde_json::json!({"type": "ATSSAssigner", "topk": 9}))?;
//! assert!(matches!(m, TaskModule::ATSSAssigner(ref a) if a.topk == 9));
//! # anyhow::Ok(())
//! ```

mod assigners;
mod coders;
mod prior_generators;
mod samplers;

use anyhow::{bail, Result};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

pub(crate) use assigners::check_image;
pub use assigners::{
    bbox_overlaps, ATSSAssigner, AssignResult, BBoxL1Cost, DynamicSoftLabelAssigner, FocalLossCost,
    GtBatch, IoUCost, MaxIoUAssigner, NegIouThr, TaskAlignedAssignResult, TaskAlignedAssigner,
    TopkHungarianAssignResult, TopkHungarianAssigner, CHUNK_ELEMENTS,
};
pub use coders::{
    bbox2distance, distance2bbox, DeltaXYWHBBoxCoder, DistancePointBBoxCoder, MaxShape,
    WH_RATIO_CLIP,
};
pub use prior_generators::{anchor_inside_flags, AnchorGenerator, MlvlPointGenerator};
pub use samplers::{
    build_sampler, PseudoSampler, RandomSampler, SampleMode, Sampler, SamplingResult,
};

/// A task module built from its config dict.
#[allow(clippy::large_enum_variant)]
pub enum TaskModule {
    /// `AnchorGenerator`.
    AnchorGenerator(AnchorGenerator),
    /// `MlvlPointGenerator`.
    MlvlPointGenerator(MlvlPointGenerator),
    /// `DeltaXYWHBBoxCoder`.
    DeltaXYWHBBoxCoder(DeltaXYWHBBoxCoder),
    /// `DistancePointBBoxCoder`.
    DistancePointBBoxCoder(DistancePointBBoxCoder),
    /// `ATSSAssigner`.
    ATSSAssigner(ATSSAssigner),
    /// `MaxIoUAssigner`.
    MaxIoUAssigner(MaxIoUAssigner),
    /// `TaskAlignedAssigner`.
    TaskAlignedAssigner(TaskAlignedAssigner),
    /// `DynamicSoftLabelAssigner`.
    DynamicSoftLabelAssigner(DynamicSoftLabelAssigner),
    /// `TopkHungarianAssigner`.
    TopkHungarianAssigner(TopkHungarianAssigner),
    /// `PseudoSampler`.
    PseudoSampler(PseudoSampler),
    /// `RandomSampler` (drawing on the device; see [`RandomSampler::with_mode`]).
    RandomSampler(RandomSampler),
}

/// Builds a task module from its config dict, by its `type`.
pub fn build(config: &Value) -> Result<TaskModule> {
    Ok(match config.get("type").and_then(Value::as_str) {
        Some("AnchorGenerator") => {
            TaskModule::AnchorGenerator(AnchorGenerator::from_config(config)?)
        }
        Some("MlvlPointGenerator") => {
            TaskModule::MlvlPointGenerator(MlvlPointGenerator::from_config(config)?)
        }
        Some("DeltaXYWHBBoxCoder") => {
            TaskModule::DeltaXYWHBBoxCoder(DeltaXYWHBBoxCoder::from_config(config)?)
        }
        Some("DistancePointBBoxCoder") => {
            TaskModule::DistancePointBBoxCoder(DistancePointBBoxCoder::from_config(config)?)
        }
        Some("ATSSAssigner") => TaskModule::ATSSAssigner(ATSSAssigner::from_config(config)?),
        Some("MaxIoUAssigner") => TaskModule::MaxIoUAssigner(MaxIoUAssigner::from_config(config)?),
        Some("DynamicSoftLabelAssigner") => {
            TaskModule::DynamicSoftLabelAssigner(DynamicSoftLabelAssigner::from_config(config)?)
        }
        Some("TaskAlignedAssigner") => {
            TaskModule::TaskAlignedAssigner(TaskAlignedAssigner::from_config(config)?)
        }
        Some("TopkHungarianAssigner") => {
            TaskModule::TopkHungarianAssigner(TopkHungarianAssigner::from_config(config)?)
        }
        Some("PseudoSampler") => TaskModule::PseudoSampler(PseudoSampler::from_config(config)?),
        Some("RandomSampler") => TaskModule::RandomSampler(RandomSampler::from_config(config)?),
        other => bail!(
            "unknown task module type {other:?} (known: AnchorGenerator, MlvlPointGenerator, \
             DeltaXYWHBBoxCoder, DistancePointBBoxCoder, ATSSAssigner, MaxIoUAssigner, \
             TaskAlignedAssigner, DynamicSoftLabelAssigner, TopkHungarianAssigner, PseudoSampler, \
             RandomSampler)"
        ),
    })
}

pub(crate) use assigners::centres;

/// The kind torch's type promotion gives MMDetection's mixed float32/float64 arithmetic here:
/// float64 if any is, else the first.
pub(crate) fn promote_kinds(kinds: &[Kind]) -> Kind {
    if kinds.contains(&Kind::Double) {
        Kind::Double
    } else {
        kinds[0]
    }
}

/// A few values as a 1-D tensor made on `device` itself (one fill each): a copy from host memory
/// would synchronise with a CUDA device, and these are made inside training steps.
pub(crate) fn device_values(values: &[f64], kind: Kind, device: Device) -> Result<Tensor> {
    let parts = values
        .iter()
        .map(|&v| Tensor::f_full([1], v, (kind, device)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::f_cat(&parts, 0)?)
}
