//! MMDetection's `GFLHead` (`mmdet/models/dense_heads/gfl_head.py`): its targets are ATSSHead's
//! ([`DenseHeadTargets`]); what is its own is what `loss_by_feat_single` builds from them and the
//! predictions for QualityFocalLoss, GIoULoss and DistributionFocalLoss, here over all anchors
//! of the batch at once (`(B, N)` masks, no host read).

use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use super::{DenseHeadTargets, HeadTargets};
use crate::task_modules::{bbox2distance, bbox_overlaps, centres, distance2bbox};

#[derive(Debug, Deserialize)]
struct GflConfig {
    #[serde(rename = "type")]
    ty: String,
    #[serde(default = "sixteen")]
    reg_max: i64,
}

fn sixteen() -> i64 {
    16
}

/// The loss inputs of a batch, over all anchors (levels concatenated), in the units
/// `loss_by_feat_single` uses: boxes and distances divided by the level's stride.
#[derive(Debug)]
pub struct GflLossInputs {
    /// `(B, N)` float32: QFL's soft target, the IoU of the decoded prediction (detached) with
    /// its ground truth at positives, 0 elsewhere.
    pub scores: Tensor,
    /// `(B, N)`: the largest class probability (detached) at positives, 0 elsewhere: the weight
    /// of the box and DFL losses.
    pub weights: Tensor,
    /// `(B, N, 4)`: the decoded predictions, `distance2bbox(centre / stride, Integral(pred))`.
    pub pred_boxes: Tensor,
    /// `(B, N, 4)`: the ground-truth boxes divided by the stride (0 off the positives).
    pub target_boxes: Tensor,
    /// `(B, N, 4)`: DFL's targets, `bbox2distance(centre / stride, target, reg_max)` (its eps
    /// 0.1: at most `reg_max - 0.1`).
    pub corner_targets: Tensor,
    /// `(B, N, 4 * (reg_max + 1))` reshaped to `(B, N, 4, reg_max + 1)`: the distribution logits
    /// DFL reads, as given.
    pub corner_logits: Tensor,
    /// 0-dim: the sum of the weights (before `reduce_mean`).
    pub weight_sum: Tensor,
}

impl GflLossInputs {
    /// `loss_by_feat`'s divisor of the box and DFL losses,
    /// `reduce_mean(Σ weights).clamp(min=1)`, through [`crate::dist::reduce_mean`].
    pub fn bbox_avg_factor(&self) -> Result<Tensor> {
        crate::dist::reduce_mean(&self.weight_sum)?
            .f_clamp_min(1.0)
            .map_err(Into::into)
    }
}

/// What `GFLHead` computes before its losses: [`DenseHeadTargets`] built from the same config
/// dict (type `GFLHead`: ATSS assignment, boxes as targets) and `reg_max`.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::dense_heads::{GFLHeadTargets, ImageMeta};
/// use tch_detloss::task_modules::GtBatch;
///
/// let head = GFLHeadTargets::from_config(&serde_json::json!({
///     "type": "GFLHead", "num_classes": 3, "reg_max": 16,
///     "anchor_generator": {"type": "AnchorGenerator", "ratios": [1.0], "octave_base_scale": 8,
///                          "scales_per_octave": 1, "strides": [8, 16]},
///     "train_cfg": {"assigner": {"type": "ATSSAssigner", "topk": 9}, "allowed_border": -1, "pos_weight": -1}}))?;
/// let metas = [ImageMeta { img_shape: (64, 64), pad_shape: (64, 64) }];
/// let gts = GtBatch::pad(&[Tensor::from_slice(&[8.0f32, 8.0, 40.0, 48.0]).view([1, 4])], &[Tensor::from_slice(&[2i64])])?;
/// let t = head.targets.get_targets(&[(8, 8), (4, 4)], &metas, &gts, None, Device::Cpu)?;
/// let cls = Tensor::zeros([1, 80, 3], (Kind::Float, Device::Cpu));
/// let reg = Tensor::zeros([1, 80, 68], (Kind::Float, Device::Cpu));
/// let l = head.loss_inputs(&t, &cls, &reg)?;
/// assert_eq!(l.corner_targets.size(), [1, 80, 4]);
/// # anyhow::Ok(())
/// ```
pub struct GFLHeadTargets {
    /// The targets (ATSSHead's).
    pub targets: DenseHeadTargets,
    /// The largest distance bin of the general distribution.
    pub reg_max: i64,
}

impl GFLHeadTargets {
    /// Builds it from a `GFLHead` config dict with a `train_cfg`.
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: GflConfig =
            serde_json::from_value(config.clone()).context("invalid GFLHead config")?;
        ensure!(
            c.ty == "GFLHead",
            "GFLHeadTargets: a GFLHead config is needed, got type {:?}",
            c.ty
        );
        ensure!(
            c.reg_max >= 1,
            "GFLHead: reg_max must be >= 1, got {}",
            c.reg_max
        );
        Ok(Self {
            targets: DenseHeadTargets::from_config(config)?,
            reg_max: c.reg_max,
        })
    }

    /// `Integral`: the expected distance `Σ softmax(logits) * [0, 1, .., reg_max]` of each of the
    /// 4 sides, `(..., 4 * (reg_max + 1))` to `(..., 4)`.
    pub fn integral(&self, logits: &Tensor) -> Result<Tensor> {
        let r = self.reg_max + 1;
        let s = logits.size();
        ensure!(
            s.last() == Some(&(4 * r)),
            "GFLHead integral: logits {s:?}, need (..., {})",
            4 * r
        );
        let p = logits.f_reshape([-1, r])?.f_softmax(1, None::<Kind>)?;
        let project =
            Tensor::f_linspace(0.0, self.reg_max as f64, r, (Kind::Float, logits.device()))?
                .f_to_kind(p.kind())?;
        let lead = &s[..s.len() - 1];
        Ok(p.f_linear::<Tensor>(&project, None)?
            .f_reshape([lead, &[4]].concat())?)
    }

    /// `loss_by_feat_single`'s inputs over the batch: `t` from [`DenseHeadTargets::get_targets`],
    /// the class logits `(B, N, C)` and the distribution logits `(B, N, 4 * (reg_max + 1))`, in
    /// the anchors' order.
    pub fn loss_inputs(
        &self,
        t: &HeadTargets,
        cls_scores: &Tensor,
        bbox_preds: &Tensor,
    ) -> Result<GflLossInputs> {
        let (b, n) = (t.labels.size()[0], t.labels.size()[1]);
        let r = self.reg_max + 1;
        ensure!(
            cls_scores.dim() == 3 && cls_scores.size()[..2] == [b, n],
            "GFLHead loss inputs: class logits {:?} for {b} images of {n} anchors",
            cls_scores.size()
        );
        ensure!(
            bbox_preds.size() == [b, n, 4 * r],
            "GFLHead loss inputs: box logits {:?}, need [{b}, {n}, {}]",
            bbox_preds.size(),
            4 * r
        );
        let dev = t.labels.device();
        let strides = self.targets.anchor_generator.strides();
        let widths: Vec<f64> = strides.iter().map(|&(sw, _)| sw).collect();
        let stride = super::level_values(&t.num_level_anchors, &widths, t.anchors.kind(), dev)?
            .f_view([1, n, 1])?;
        let centres = centres(&t.anchors) / &stride;
        let pos = t
            .labels
            .f_ge(0)?
            .f_logical_and(&t.labels.f_lt(self.targets.num_classes)?)?;
        let weights = cls_scores
            .f_detach()?
            .f_sigmoid()?
            .f_max_dim(-1, false)?
            .0
            .f_where_scalarother(&pos, 0.0)?;
        let corners = self.integral(bbox_preds)?;
        let pred_boxes = distance2bbox(&centres, &corners, None)?;
        let target_boxes = t.bbox_targets.f_div(&stride)?;
        let iou = bbox_overlaps(
            &pred_boxes.f_detach()?.f_unsqueeze(2)?,
            &target_boxes.f_unsqueeze(2)?,
            false,
        )?
        .f_view([b, n])?;
        let scores = iou.f_to_kind(Kind::Float)?.f_where_scalarother(&pos, 0.0)?;
        let corner_targets =
            bbox2distance(&centres, &target_boxes, Some(self.reg_max as f64), 0.1)?;
        Ok(GflLossInputs {
            weight_sum: weights.f_sum(weights.kind())?,
            scores,
            weights,
            pred_boxes,
            target_boxes,
            corner_targets,
            corner_logits: bbox_preds.f_view([b, n, 4, r])?,
        })
    }
}
