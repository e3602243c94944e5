//! MMDetection's match costs (`match_cost.py`) that [`TopkHungarianAssigner`] takes:
//! `FocalLossCost`, `BBoxL1Cost` and `IoUCost`, each a `(queries, ground truths)` matrix.
//!
//! [`TopkHungarianAssigner`]: super::TopkHungarianAssigner

use anyhow::{bail, ensure, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::Tensor;

use super::{bbox_gious, bbox_overlaps};
use crate::registry::parse_config;

/// Parses a cost config of type `ty`.
fn parse<T: serde::de::DeserializeOwned>(config: &Value, ty: &str) -> Result<T> {
    match config.get("type").and_then(Value::as_str) {
        Some(t) if t == ty => parse_config(config),
        other => bail!("only {ty} is supported here, got type {other:?}"),
    }
}

/// `FocalLossCost`: the focal loss of each query's score for each ground truth's class,
/// positive minus negative term, times `weight`. The scores are taken as logits (a sigmoid is
/// applied first), as in MMDetection.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FocalLossCost {
    /// The focal weighting of positives.
    pub alpha: f64,
    /// The focusing exponent.
    pub gamma: f64,
    /// Added inside the logarithms.
    pub eps: f64,
    /// Mask input (MMDetection's `_mask_focal_loss_cost`): not supported.
    pub binary_input: bool,
    /// Multiplies the cost.
    pub weight: f64,
}

impl Default for FocalLossCost {
    fn default() -> Self {
        Self {
            alpha: 0.25,
            gamma: 2.0,
            eps: 1e-12,
            binary_input: false,
            weight: 1.0,
        }
    }
}

impl FocalLossCost {
    /// From its config dict.
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: Self = parse(config, "FocalLossCost")?;
        ensure!(
            !c.binary_input,
            "FocalLossCost: binary_input (mask costs) is not supported"
        );
        Ok(c)
    }

    /// The `(Q, G)` cost of scores `(Q, C)` against ground-truth classes `(G,)`.
    pub fn cost(&self, scores: &Tensor, gt_labels: &Tensor) -> Result<Tensor> {
        let p = scores.f_sigmoid()?;
        let neg = p
            .f_rsub_scalar(1.0)?
            .f_add_scalar(self.eps)?
            .f_log()?
            .f_neg()?
            .f_mul_scalar(1.0 - self.alpha)?
            .f_mul(&p.f_pow_tensor_scalar(self.gamma)?)?;
        let pos = p
            .f_add_scalar(self.eps)?
            .f_log()?
            .f_neg()?
            .f_mul_scalar(self.alpha)?
            .f_mul(&p.f_rsub_scalar(1.0)?.f_pow_tensor_scalar(self.gamma)?)?;
        let pick = |t: &Tensor| t.f_index_select(1, gt_labels);
        Ok(pick(&pos)?.f_sub(&pick(&neg)?)?.f_mul_scalar(self.weight)?)
    }
}

/// `BBoxL1Cost`: the L1 distance of the boxes normalised by the image size, in `xyxy` or
/// `xywh` (centre and size) form, times `weight`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BBoxL1Cost {
    /// `"xyxy"` or `"xywh"`.
    pub box_format: String,
    /// Multiplies the cost.
    pub weight: f64,
}

impl Default for BBoxL1Cost {
    fn default() -> Self {
        Self {
            box_format: "xyxy".into(),
            weight: 1.0,
        }
    }
}

impl BBoxL1Cost {
    /// From its config dict.
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: Self = parse(config, "BBoxL1Cost")?;
        ensure!(
            c.box_format == "xyxy" || c.box_format == "xywh",
            "BBoxL1Cost: box_format must be 'xyxy' or 'xywh', got {:?}",
            c.box_format
        );
        Ok(c)
    }

    /// The `(Q, G)` cost of boxes `(Q, 4)` against `(G, 4)` in an image of `(height, width)`.
    pub fn cost(&self, pred: &Tensor, gt: &Tensor, img_shape: (i64, i64)) -> Result<Tensor> {
        let cxcywh = |b: &Tensor| -> Result<Tensor> {
            let c = |k: i64| b.f_select(-1, k);
            Ok(Tensor::f_stack(
                &[
                    c(0)?.f_add(&c(2)?)?.f_div_scalar(2.0)?,
                    c(1)?.f_add(&c(3)?)?.f_div_scalar(2.0)?,
                    c(2)?.f_sub(&c(0)?)?,
                    c(3)?.f_sub(&c(1)?)?,
                ],
                -1,
            )?)
        };
        let (pred, gt) = if self.box_format == "xywh" {
            (cxcywh(pred)?, cxcywh(gt)?)
        } else {
            (pred.shallow_clone(), gt.shallow_clone())
        };
        let (h, w) = (img_shape.0 as f64, img_shape.1 as f64);
        let factor = Tensor::f_from_slice(&[w, h, w, h])?
            .f_to_kind(gt.kind())?
            .f_to_device(gt.device())?
            .f_unsqueeze(0)?;
        let cost = Tensor::f_cdist(&pred.f_div(&factor)?, &gt.f_div(&factor)?, 1.0, None)?;
        Ok(cost.f_mul_scalar(self.weight)?)
    }
}

/// `IoUCost`: minus the IoU (or GIoU) of each query's box with each ground truth, times
/// `weight`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IoUCost {
    /// `"iou"` or `"giou"`.
    pub iou_mode: String,
    /// Multiplies the cost.
    pub weight: f64,
}

impl Default for IoUCost {
    fn default() -> Self {
        Self {
            iou_mode: "giou".into(),
            weight: 1.0,
        }
    }
}

impl IoUCost {
    /// From its config dict.
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: Self = parse(config, "IoUCost")?;
        ensure!(
            c.iou_mode == "iou" || c.iou_mode == "giou",
            "IoUCost: iou_mode must be 'iou' or 'giou', got {:?}",
            c.iou_mode
        );
        Ok(c)
    }

    /// The `(Q, G)` cost of boxes `(Q, 4)` against `(G, 4)`.
    pub fn cost(&self, pred: &Tensor, gt: &Tensor) -> Result<Tensor> {
        let overlaps = if self.iou_mode == "giou" {
            bbox_gious(pred, gt)?
        } else {
            bbox_overlaps(pred, gt, false)?
        };
        Ok(overlaps.f_mul_scalar(-self.weight)?)
    }
}
