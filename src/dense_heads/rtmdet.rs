//! MMDetection's `RTMDetHead` targets (`mmdet/models/dense_heads/rtmdet_head.py`: `get_targets`,
//! `_get_targets_single` and the divisors of `loss_by_feat`), batched over images.
//!
//! The priors are points with their strides; each image's inside priors go to the
//! [`DynamicSoftLabelAssigner`] with the decoded predictions and class logits, a
//! `PseudoSampler` takes its positives, and the targets are QualityFocalLoss's `(labels,
//! assign_metrics)` with `label_weights`, and GIoU's ground-truth boxes weighted by the same
//! metrics, all `(B, N)` over all priors, as masks: no host read.

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::ImageMeta;
use crate::task_modules::{distance2bbox, DynamicSoftLabelAssigner, GtBatch, MlvlPointGenerator};

#[derive(Debug, Deserialize)]
struct RtmConfig {
    #[serde(rename = "type")]
    ty: String,
    num_classes: i64,
    #[serde(default)]
    anchor_generator: Option<Value>,
    #[serde(default)]
    bbox_coder: Option<Value>,
    train_cfg: Option<super::TrainConfig>,
}

/// The targets of a batch over all `N` priors of each image (levels concatenated).
#[derive(Debug)]
pub struct RtmdetTargets {
    /// `(B, N)` int64: the class of each positive, `num_classes` (background) elsewhere.
    pub labels: Tensor,
    /// `(B, N)` float32: 1 (or `pos_weight`) at positives, 1 at the other inside priors, 0
    /// outside.
    pub label_weights: Tensor,
    /// `(B, N, 4)`: the assigned ground-truth box at positives, 0 elsewhere.
    pub bbox_targets: Tensor,
    /// `(B, N)` float32: the positives' IoU with their ground truth (the soft label of QFL and
    /// the weight of the box loss), 0 elsewhere.
    pub assign_metrics: Tensor,
    /// `(B, N)` bool: the positives.
    pub pos_mask: Tensor,
    /// Priors per level.
    pub num_level_priors: Vec<i64>,
}

impl RtmdetTargets {
    /// `loss_by_feat`'s divisors of the classification and box losses:
    /// `reduce_mean(Σ assign_metrics).clamp(min=1)` and the same over the positives' weights,
    /// through [`crate::dist::reduce_mean`]; on the device.
    pub fn avg_factors(&self) -> Result<(Tensor, Tensor)> {
        let total = self.assign_metrics.f_sum(Kind::Float)?;
        let pos = self
            .assign_metrics
            .f_masked_fill(&self.pos_mask.f_logical_not()?, 0.0)?
            .f_sum(Kind::Float)?;
        Ok((
            crate::dist::reduce_mean(&total)?.f_clamp_min(1.0)?,
            crate::dist::reduce_mean(&pos)?.f_clamp_min(1.0)?,
        ))
    }

    /// Splits a `(B, N, ...)` tensor into the per-level `(B, n_l, ...)` list.
    pub fn levels(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        Ok(t.f_split_with_sizes(self.num_level_priors.as_slice(), 1)?)
    }
}

/// What `RTMDetHead` computes for its losses before the loss functions, built from the head's
/// config dict (`num_classes`, `anchor_generator`, `bbox_coder`, `train_cfg`; layer and loss
/// keys are not read).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::dense_heads::{ImageMeta, RTMDetHeadTargets};
/// use tch_detloss::task_modules::GtBatch;
///
/// let head = RTMDetHeadTargets::from_config(&serde_json::json!({
///     "type": "RTMDetHead", "num_classes": 3,
///     "anchor_generator": {"type": "MlvlPointGenerator", "offset": 0, "strides": [8, 16]},
///     "train_cfg": {"assigner": {"type": "DynamicSoftLabelAssigner", "topk": 13},
///                   "allowed_border": -1, "pos_weight": -1, "debug": false}}))?;
/// let metas = [ImageMeta { img_shape: (64, 64), pad_shape: (64, 64) }];
/// let (priors, valid, counts) = head.priors(&[(8, 8), (4, 4)], &metas, Device::Cpu)?;
/// let n = priors.size()[0];
/// let decoded = head.decode(&priors, &(Tensor::ones([1, n, 4], (Kind::Float, Device::Cpu)) * 12.0))?;
/// let logits = Tensor::zeros([1, n, 3], (Kind::Float, Device::Cpu));
/// let gts = GtBatch::pad(&[Tensor::from_slice(&[8.0f32, 8.0, 40.0, 48.0]).view([1, 4])], &[Tensor::from_slice(&[2i64])])?;
/// let t = head.targets(&priors, &counts, &valid, &metas, &decoded, &logits, &gts)?;
/// assert_eq!(t.labels.size(), [1, 80]);
/// assert!(t.pos_mask.any().int64_value(&[]) == 1);
/// # anyhow::Ok(())
/// ```
#[derive(Debug)]
pub struct RTMDetHeadTargets {
    /// The head's `num_classes` (the background label).
    pub num_classes: i64,
    /// The head's point generator (RTMDet's `MlvlPointGenerator`, offset 0).
    pub prior_generator: MlvlPointGenerator,
    /// `train_cfg.assigner`.
    pub assigner: DynamicSoftLabelAssigner,
    /// `train_cfg.allowed_border`.
    pub allowed_border: f64,
    /// `train_cfg.pos_weight`.
    pub pos_weight: f64,
}

impl RTMDetHeadTargets {
    /// Builds it from an `RTMDetHead` (or `RTMDetSepBNHead`) config dict with a `train_cfg`.
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: RtmConfig =
            serde_json::from_value(config.clone()).context("invalid RTMDetHead config")?;
        ensure!(
            c.ty == "RTMDetHead" || c.ty == "RTMDetSepBNHead",
            "RTMDetHeadTargets: an RTMDetHead config is needed, got type {:?}",
            c.ty
        );
        ensure!(
            c.num_classes > 0,
            "{}: num_classes must be > 0, got {}",
            c.ty,
            c.num_classes
        );
        let train = c
            .train_cfg
            .with_context(|| format!("{}: targets need a train_cfg", c.ty))?;
        let generator = c.anchor_generator.unwrap_or_else(|| {
            serde_json::json!({"type": "MlvlPointGenerator", "offset": 0, "strides": [8, 16, 32]})
        });
        ensure!(
            generator.get("type").and_then(Value::as_str) == Some("MlvlPointGenerator"),
            "{}: the prior generator must be an MlvlPointGenerator, got {generator}",
            c.ty
        );
        if let Some(coder) = &c.bbox_coder {
            ensure!(
                coder.get("type").and_then(Value::as_str) == Some("DistancePointBBoxCoder"),
                "{}: only DistancePointBBoxCoder is supported, got {coder}",
                c.ty
            );
        }
        ensure!(
            train.assigner.get("type").and_then(Value::as_str) == Some("DynamicSoftLabelAssigner"),
            "{}: only the DynamicSoftLabelAssigner is supported, got {}",
            c.ty,
            train.assigner
        );
        if let Some(s) = &train.sampler {
            if s.get("type").and_then(Value::as_str) != Some("PseudoSampler") {
                bail!("{}: only the PseudoSampler is supported, got {s}", c.ty);
            }
        }
        Ok(Self {
            num_classes: c.num_classes,
            prior_generator: MlvlPointGenerator::from_config(&generator)?,
            assigner: DynamicSoftLabelAssigner::from_config(&train.assigner)?,
            allowed_border: train.allowed_border,
            pos_weight: train.pos_weight,
        })
    }

    /// The priors of all levels `(N, 4)` float32 (`x, y, stride_w, stride_h`), their valid
    /// flags per image `(B, N)` for the images' `pad_shape`s, and the count per level.
    pub fn priors(
        &self,
        featmap_sizes: &[(i64, i64)],
        metas: &[ImageMeta],
        device: Device,
    ) -> Result<(Tensor, Tensor, Vec<i64>)> {
        let levels = self
            .prior_generator
            .grid_priors(featmap_sizes, Kind::Float, device, true)?;
        let counts = levels.iter().map(|t| t.size()[0]).collect();
        let flags = super::image_flags(metas, |pad| {
            self.prior_generator.valid_flags(featmap_sizes, pad, device)
        })?;
        Ok((Tensor::f_cat(&levels, 0)?, flags, counts))
    }

    /// `loss_by_feat`'s decoding: the boxes `(B, N, 4)` at distances `(B, N, 4)` (already
    /// multiplied by the strides, as the head's forward returns them) from the priors' points.
    pub fn decode(&self, priors: &Tensor, distances: &Tensor) -> Result<Tensor> {
        let s = distances.size();
        ensure!(
            s.len() == 3 && priors.dim() == 2 && priors.size()[1] == 4,
            "RTMDetHead decode: priors (N, 4) and distances (B, N, 4), got {:?} and {s:?}",
            priors.size()
        );
        let p = priors
            .narrow(1, 0, 2)
            .f_unsqueeze(0)?
            .f_expand([s[0], s[1], 2], false)?;
        distance2bbox(&p, distances, None)
    }

    /// The targets of a batch: `priors` `(N, 4)` with their per-level counts and `valid` flags
    /// `(B, N)`, the decoded predictions `(B, N, 4)` and the class logits `(B, N, C)` (both
    /// detached here, as MMDetection does).
    #[allow(clippy::too_many_arguments)]
    pub fn targets(
        &self,
        priors: &Tensor,
        num_level_priors: &[i64],
        valid: &Tensor,
        metas: &[ImageMeta],
        decoded: &Tensor,
        cls_scores: &Tensor,
        gts: &GtBatch,
    ) -> Result<RtmdetTargets> {
        let (_, _, inside) = super::checked_inside(
            "RTMDetHead",
            priors,
            num_level_priors,
            valid,
            metas,
            gts,
            self.allowed_border,
        )?;
        let r = self.assigner.assign(
            priors,
            &decoded.f_detach()?,
            &cls_scores.f_detach()?,
            gts,
            Some(&inside),
        )?;
        let t = super::sampled_targets(
            &r,
            &inside,
            gts,
            self.num_classes,
            self.pos_weight,
            priors.kind(),
        )?;
        let pos = t.pos;
        let assign_metrics = r
            .max_overlaps
            .f_to_kind(Kind::Float)?
            .f_where_scalarother(&pos, 0.0)?;
        Ok(RtmdetTargets {
            labels: t.labels,
            label_weights: t.label_weights,
            bbox_targets: t.bbox_targets,
            assign_metrics,
            pos_mask: pos,
            num_level_priors: num_level_priors.to_vec(),
        })
    }
}
