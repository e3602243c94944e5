//! The heads the example trains, one module each, as MMDetection 3.3 builds them: their own
//! branches and initialisation, their config dict (scaled to the example's 128-pixel images and
//! 2-conv towers), the targets from `tch_detloss::dense_heads` and `loss_by_feat` over the whole
//! batch at once, and the test-time scores and boxes.
//!
//! | `--head` | MMDetection | targets | losses |
//! |---|---|---|---|
//! | `atss` | `ATSSHead` | `DenseHeadTargets` (ATSSAssigner) | Focal, GIoU × centerness, CE centerness |
//! | `gfl` | `GFLHead` | `GFLHeadTargets` (ATSSAssigner) | QFL, GIoU × max score, DFL |
//! | `fcos` | `FCOSHead` (center sampling, `norm_on_bbox`, `centerness_on_reg`, GIoU) | `FCOSHeadTargets` | Focal, GIoU × centerness, CE centerness |
//! | `rtmdet` | `RTMDetSepBNHead` | `RTMDetHeadTargets` (DynamicSoftLabelAssigner) | QFL, GIoU × assign metrics |
//! | `tood` | `TOODHead` (anchor-free) | ATSS first, then `TOODHeadTargets` (TaskAlignedAssigner) | Focal then QFL (both on probabilities), GIoU |
//!
//! Every loss runs over all priors with zero weights off the positives, which the fused box
//! kernels treat as "contributes nothing"; no host read anywhere in a step.

mod atss;
mod fcos;
mod gfl;
mod rtmdet;
mod tood;

use anyhow::{bail, Result};
use tch::{nn, Device, Kind, Tensor};
use tch_detloss::dense_heads::ImageMeta;
use tch_detloss::task_modules::GtBatch;
use tch_detloss::{Loss, LossArgs, Target};

use crate::model::STRIDES;

/// The names `--head` takes.
pub const NAMES: [&str; 5] = ["atss", "gfl", "fcos", "rtmdet", "tood"];

/// The head's name as its paper writes it.
pub fn title(name: &str) -> &'static str {
    match name {
        "atss" => "ATSS",
        "gfl" => "GFL",
        "fcos" => "FCOS",
        "rtmdet" => "RTMDet",
        "tood" => "TOOD",
        _ => "?",
    }
}

/// A head's outputs over all levels, flattened into the priors' order (each head says what its
/// tensors hold).
pub struct Outputs {
    /// `(B, N, C)`: class logits (TOOD: probabilities, as its head returns them).
    pub cls: Tensor,
    /// `(B, N, K)`: the box branch.
    pub reg: Tensor,
    /// `(B, N)`: the centerness logits of the heads that have them.
    pub ctr: Option<Tensor>,
}

/// One head: its layers, its targets and its losses.
pub trait Head {
    /// The loss terms `losses` returns, in order, as MMDetection names them.
    fn loss_names(&self) -> &'static [&'static str];
    /// The number of priors (anchors or points) per image.
    fn num_priors(&self) -> i64;
    /// The raw outputs for the pyramid's features.
    fn forward_t(&self, feats: &[Tensor], train: bool) -> Outputs;
    /// The targets of a batch at training step `step` (the first half of `loss_by_feat`; some
    /// heads assign on their own detached predictions).
    fn targets(&self, out: &Outputs, gts: &GtBatch, step: i64) -> Result<Targets>;
    /// The rest of `loss_by_feat`: the loss terms for `targets` (fused, or the stock-op
    /// composition), each divided as MMDetection divides it.
    fn losses(&self, out: &Outputs, targets: &Targets, fused: bool) -> Result<Vec<Tensor>>;
    /// Test-time class probabilities `(B, N, C)` (times centerness where the head has it) and
    /// boxes `(B, N, 4)` in pixels.
    fn predict(&self, out: &Outputs) -> Result<(Tensor, Tensor)>;
}

/// The targets of one step, whichever head computed them.
pub enum Targets {
    Anchor(tch_detloss::dense_heads::HeadTargets),
    Fcos(tch_detloss::dense_heads::FcosTargets),
    Rtmdet(tch_detloss::dense_heads::RtmdetTargets),
    Tood(tch_detloss::dense_heads::ToodTargets),
}

/// What every head is built for: images per step, their side, the device, and (TOOD) the
/// steps that stand for MMDetection's initial epochs.
pub struct Setup {
    pub batch: i64,
    pub size: i64,
    pub device: Device,
    pub initial_steps: i64,
}

impl Setup {
    /// The feature-map sizes of the pyramid.
    pub fn featmaps(&self) -> Vec<(i64, i64)> {
        STRIDES
            .iter()
            .map(|s| (self.size / s, self.size / s))
            .collect()
    }
    /// Every image's meta (all of one size, unpadded).
    pub fn metas(&self) -> Vec<ImageMeta> {
        vec![
            ImageMeta {
                img_shape: (self.size, self.size),
                pad_shape: (self.size, self.size)
            };
            self.batch as usize
        ]
    }
}

/// Builds the head `name` under `vs` for `classes` classes.
pub fn build(name: &str, vs: &nn::Path, classes: i64, setup: &Setup) -> Result<Box<dyn Head>> {
    let vs = vs / "bbox_head";
    Ok(match name {
        "atss" => Box::new(atss::Atss::new(&vs, classes, setup)?),
        "gfl" => Box::new(gfl::Gfl::new(&vs, classes, setup)?),
        "fcos" => Box::new(fcos::Fcos::new(&vs, classes, setup)?),
        "rtmdet" => Box::new(rtmdet::Rtmdet::new(&vs, classes, setup)?),
        "tood" => Box::new(tood::Tood::new(&vs, classes, setup)?),
        h => bail!("unknown head {h} ({})", NAMES.join(", ")),
    })
}

/// One loss call, fused or through the stock-op composition.
fn call(
    loss: &dyn Loss,
    fused: bool,
    pred: &Tensor,
    target: Target<'_>,
    args: &LossArgs<'_>,
) -> Result<Tensor> {
    if fused {
        loss.forward(pred, target, args)
    } else {
        loss.forward_unfused(pred, target, args)
    }
}

/// MMDetection's divisor of a loss over the batch, `reduce_mean(x).clamp(min=1)`: the mean over
/// the ranks (the same number on all, so that DDP's average of the gradients is the gradient of
/// the whole batch's loss), on the device.
fn divisor(x: &Tensor) -> Result<Tensor> {
    Ok(tch_detloss::dist::reduce_mean(x)?.clamp_min(1.0))
}

/// The stride of each prior `(N, 1)` float32, from the per-level counts.
fn prior_strides(counts: &[i64], device: Device) -> Tensor {
    let per: Vec<Tensor> = counts
        .iter()
        .zip(STRIDES)
        .map(|(&n, s)| Tensor::full([n], s as f64, (Kind::Float, device)))
        .collect();
    Tensor::cat(&per, 0).unsqueeze(-1)
}

/// The same outputs' levels as `(B, K, H, W)` tensors flattened.
fn flat(levels: &[Tensor]) -> Tensor {
    crate::model::flatten_levels(levels)
}
