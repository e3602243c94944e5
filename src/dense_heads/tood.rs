//! MMDetection's `TOODHead` targets after its initial epochs (`mmdet/models/dense_heads/
//! tood_head.py`: `get_targets` with the alignment assigner, `_get_targets_single`), batched over
//! images. The initial epochs (`epoch < initial_epoch`) are ATSSHead's targets: build
//! [`super::DenseHeadTargets`] from the head's `initial_assigner`.

use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::{ImageMeta, TrainConfig};
use crate::task_modules::{AnchorGenerator, GtBatch, TaskAlignedAssigner};

#[derive(Debug, Deserialize)]
struct ToodConfig {
    #[serde(rename = "type")]
    ty: String,
    num_classes: i64,
    #[serde(default)]
    anchor_generator: Option<Value>,
    train_cfg: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ToodTrain {
    #[serde(flatten)]
    base: TrainConfig,
    #[serde(default = "one")]
    alpha: f64,
    #[serde(default = "six")]
    beta: f64,
}

fn one() -> f64 {
    1.0
}
fn six() -> f64 {
    6.0
}

/// The targets of a batch over all `N` anchors of each image (levels concatenated).
#[derive(Debug)]
pub struct ToodTargets {
    /// `(B, N)` int64: the class of each positive, `num_classes` (background) elsewhere.
    pub labels: Tensor,
    /// `(B, N)` float32: 1 (or `pos_weight`) at positives, 1 at the other inside anchors, 0
    /// outside.
    pub label_weights: Tensor,
    /// `(B, N, 4)`: the assigned ground-truth box at positives, 0 elsewhere.
    pub bbox_targets: Tensor,
    /// `(B, N)` float32: the normalised alignment metrics, QFL's soft label and the box loss's
    /// weight: per ground truth, `t / (max t + 1e-7) * max IoU` over its positives; 0 elsewhere.
    pub alignment_metrics: Tensor,
    /// `(B, N)` bool: the positives.
    pub pos_mask: Tensor,
    /// Anchors per level.
    pub num_level_anchors: Vec<i64>,
}

impl ToodTargets {
    /// Splits a `(B, N, ...)` tensor into the per-level `(B, n_l, ...)` list.
    pub fn levels(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        Ok(t.f_split_with_sizes(self.num_level_anchors.as_slice(), 1)?)
    }
}

/// What `TOODHead.get_targets` computes after the initial epochs, built from the head's config
/// dict (`num_classes`, `anchor_generator`, `train_cfg` with `assigner` — the alignment
/// assigner — `alpha`, `beta`, `allowed_border`, `pos_weight`).
#[derive(Debug)]
pub struct TOODHeadTargets {
    /// The head's `num_classes` (the background label).
    pub num_classes: i64,
    /// The head's anchor generator.
    pub anchor_generator: AnchorGenerator,
    /// `train_cfg.assigner`.
    pub assigner: TaskAlignedAssigner,
    /// `train_cfg.alpha` and `beta` of the alignment metric.
    pub alpha: f64,
    /// See `alpha`.
    pub beta: f64,
    /// `train_cfg.allowed_border`.
    pub allowed_border: f64,
    /// `train_cfg.pos_weight`.
    pub pos_weight: f64,
}

impl TOODHeadTargets {
    /// Builds it from a `TOODHead` config dict with a `train_cfg`.
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: ToodConfig =
            serde_json::from_value(config.clone()).context("invalid TOODHead config")?;
        ensure!(
            c.ty == "TOODHead",
            "TOODHeadTargets: a TOODHead config is needed, got type {:?}",
            c.ty
        );
        ensure!(
            c.num_classes > 0,
            "TOODHead: num_classes must be > 0, got {}",
            c.num_classes
        );
        let train: ToodTrain =
            serde_json::from_value(c.train_cfg.context("TOODHead: targets need a train_cfg")?)
                .context("invalid TOODHead train_cfg")?;
        ensure!(
            train.base.assigner.get("type").and_then(Value::as_str) == Some("TaskAlignedAssigner"),
            "TOODHead: train_cfg.assigner must be the TaskAlignedAssigner, got {}",
            train.base.assigner
        );
        let default_anchors = serde_json::json!({"type": "AnchorGenerator", "ratios": [1.0],
            "octave_base_scale": 8, "scales_per_octave": 1, "strides": [8, 16, 32, 64, 128]});
        Ok(Self {
            num_classes: c.num_classes,
            anchor_generator: AnchorGenerator::from_config(
                c.anchor_generator.as_ref().unwrap_or(&default_anchors),
            )?,
            assigner: TaskAlignedAssigner::from_config(&train.base.assigner)?,
            alpha: train.alpha,
            beta: train.beta,
            allowed_border: train.base.allowed_border,
            pos_weight: train.base.pos_weight,
        })
    }

    /// The anchors of all levels `(N, 4)` float32, their valid flags per image `(B, N)` and the
    /// count per level.
    pub fn anchors(
        &self,
        featmap_sizes: &[(i64, i64)],
        metas: &[ImageMeta],
        device: Device,
    ) -> Result<(Tensor, Tensor, Vec<i64>)> {
        super::grid_anchors(&self.anchor_generator, featmap_sizes, metas, device)
    }

    /// The targets of a batch: the anchors with their counts and valid flags, the decoded box
    /// predictions `(B, N, 4)` and the class scores `(B, N, C)` (probabilities, as TOOD's head
    /// gives them), both detached here as MMDetection does.
    #[allow(clippy::too_many_arguments)]
    pub fn targets(
        &self,
        anchors: &Tensor,
        num_level_anchors: &[i64],
        valid: &Tensor,
        metas: &[ImageMeta],
        decoded: &Tensor,
        scores: &Tensor,
        gts: &GtBatch,
    ) -> Result<ToodTargets> {
        let (b, n, inside) = super::checked_inside(
            "TOODHead",
            anchors,
            num_level_anchors,
            valid,
            metas,
            gts,
            self.allowed_border,
        )?;
        let g = gts.dims()?.1;
        let r = self.assigner.assign(
            anchors,
            &decoded.f_detach()?,
            &scores.f_detach()?,
            gts,
            self.alpha,
            self.beta,
            Some(&inside),
        )?;
        let dev = anchors.device();
        let res = &r.result;
        let super::Sampled {
            pos,
            labels,
            label_weights,
            bbox_targets,
        } = super::sampled_targets(
            res,
            &inside,
            gts,
            self.num_classes,
            self.pos_weight,
            anchors.kind(),
        )?;
        let zero_metric = Tensor::f_zeros([b, n], (Kind::Float, dev))?;
        if g == 0 {
            return Ok(ToodTargets {
                labels,
                label_weights,
                bbox_targets,
                alignment_metrics: zero_metric,
                pos_mask: pos,
                num_level_anchors: num_level_anchors.to_vec(),
            });
        }
        let idx = (&res.gt_inds - 1).f_clamp_min(0)?;
        // Per ground truth, the largest metric and IoU over its positives (an amax scatter-reduce
        // over (image, ground truth); the metrics and IoUs are >= 0, so 0 starts them). tch names
        // `torch::scatter_reduce(dim, index, src, reduce, include_self)` `internal_scatter_reduce`;
        // `index_reduce`, the same here, would print libtorch's "beta API" warning.
        let metric = r
            .assign_metrics
            .f_to_kind(Kind::Float)?
            .f_where_scalarother(&pos, 0.0)?;
        let iou = res
            .max_overlaps
            .f_to_kind(Kind::Float)?
            .f_where_scalarother(&pos, 0.0)?;
        let slot =
            (Tensor::f_arange(b, (Kind::Int64, dev))?.f_view([b, 1])? * g + &idx).f_view([-1])?;
        let per_gt = |x: &Tensor| -> Result<Tensor> {
            let top = Tensor::f_zeros([b * g], (Kind::Float, dev))?.f_internal_scatter_reduce(
                0,
                &slot,
                &x.f_view([-1])?,
                "amax",
                true,
            )?;
            Ok(top.f_gather(0, &slot, false)?.f_view([b, n])?)
        };
        let (max_metric, max_iou) = (per_gt(&metric)?, per_gt(&iou)?);
        let norm = (&metric / (max_metric + 10e-8)) * max_iou;
        Ok(ToodTargets {
            labels,
            label_weights,
            bbox_targets,
            alignment_metrics: norm.f_where_self(&pos, &zero_metric)?,
            pos_mask: pos,
            num_level_anchors: num_level_anchors.to_vec(),
        })
    }
}
