//! MMDetection's `TopkHungarianAssigner` (`topk_hungarian_assigner.py`, DDQ-DETR's dense
//! queries): one image at a time, as MMDetection's, since the matching itself runs on the host.

use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::match_cost::{BBoxL1Cost, FocalLossCost, IoUCost};
use super::{bbox_overlaps, check_topk_and_iou};
use crate::registry::parse_config;

const NAME: &str = "TopkHungarianAssigner";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    topk: i64,
    #[serde(default)]
    iou_calculator: Option<Value>,
    #[serde(default)]
    cls_cost: Option<Value>,
    #[serde(default)]
    reg_cost: Option<Value>,
    #[serde(default)]
    iou_cost: Option<Value>,
}

/// MMDetection's `TopkHungarianAssigner`: each ground truth is matched to `topk` queries (fewer
/// where there are not `topk` queries per ground truth) by a minimum-cost assignment
/// (`scipy.optimize.linear_sum_assignment`, here the same Jonker-Volgenant algorithm by the
/// `lsap` crate) over the sum of three costs: [`FocalLossCost`] (weight 2), [`BBoxL1Cost`]
/// (weight 5, boxes normalised by the image size) and [`IoUCost`] (GIoU, weight 2). The
/// unmatched queries are negatives.
///
/// The matrix goes to the host for the matching, as in MMDetection: this assigner reads the
/// device back.
///
/// ```
/// use tch::Tensor;
/// use tch_detloss::task_modules::TopkHungarianAssigner;
/// let a = TopkHungarianAssigner::from_config(&serde_json::json!({"type": "TopkHungarianAssigner", "topk": 1}))?;
/// let scores = Tensor::from_slice(&[0.9f32, 0.1, 0.2, 0.8]).view([2, 2]);
/// let boxes = Tensor::from_slice(&[0.0f32, 0.0, 10.0, 10.0, 20.0, 20.0, 30.0, 30.0]).view([2, 4]);
/// let gt = Tensor::from_slice(&[21.0f32, 21.0, 30.0, 30.0]).view([1, 4]);
/// let r = a.assign(&scores, &boxes, &gt, &Tensor::from_slice(&[1i64]), (64, 64), 1.0, 6.0)?;
/// assert_eq!(Vec::<i64>::try_from(&r.gt_inds)?, [0, 1]);
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug)]
pub struct TopkHungarianAssigner {
    /// Queries per ground truth.
    pub topk: i64,
    /// The classification cost.
    pub cls_cost: FocalLossCost,
    /// The box distance cost.
    pub reg_cost: BBoxL1Cost,
    /// The overlap cost.
    pub iou_cost: IoUCost,
}

/// A [`TopkHungarianAssigner`]'s result for one image with `Q` queries and `P` matches.
#[derive(Debug)]
pub struct TopkHungarianAssignResult {
    /// Ground truths in the image.
    pub num_gts: i64,
    /// `(Q,)` int64: 0 negative, k > 0 matched to the k-th ground truth.
    pub gt_inds: Tensor,
    /// `(Q,)` int64: the class of the matched ground truth, -1 where none.
    pub labels: Tensor,
    /// `(P,)`: the IoU of each matched query with its ground truth, in query order (MMDetection's
    /// `max_overlaps`, which here holds only the matches).
    pub max_overlaps: Tensor,
    /// `(P,)`: each match's alignment metric `score^alpha * IoU^beta`, in query order.
    pub assign_metrics: Tensor,
}

impl TopkHungarianAssigner {
    /// From its config dict (`topk`; `iou_calculator` only the default `BboxOverlaps2D`;
    /// `cls_cost`, `reg_cost` and `iou_cost` of the types above).
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: Config = parse_config(config)?;
        check_topk_and_iou(c.topk, c.iou_calculator.as_ref(), NAME)?;
        let cost = |v: Option<Value>, default: Value| v.unwrap_or(default);
        Ok(Self {
            topk: c.topk,
            cls_cost: FocalLossCost::from_config(&cost(
                c.cls_cost,
                serde_json::json!({"type": "FocalLossCost", "weight": 2.0}),
            ))
            .context(NAME)?,
            reg_cost: BBoxL1Cost::from_config(&cost(
                c.reg_cost,
                serde_json::json!({"type": "BBoxL1Cost", "weight": 5.0}),
            ))
            .context(NAME)?,
            iou_cost: IoUCost::from_config(&cost(
                c.iou_cost,
                serde_json::json!({"type": "IoUCost", "iou_mode": "giou", "weight": 2.0}),
            ))
            .context(NAME)?,
        })
    }

    /// Assigns one image's queries: scores `(Q, C)` (probabilities, to which
    /// [`FocalLossCost`] applies its sigmoid, as MMDetection's), decoded boxes `(Q, 4)` in xyxy
    /// pixels, ground truths `(G, 4)` and their classes `(G,)` in `[0, C)`, the image's
    /// `(height, width)`; `alpha` and `beta` shape the alignment metric.
    #[allow(clippy::too_many_arguments)]
    pub fn assign(
        &self,
        pred_scores: &Tensor,
        decode_bboxes: &Tensor,
        gt_bboxes: &Tensor,
        gt_labels: &Tensor,
        img_shape: (i64, i64),
        alpha: f64,
        beta: f64,
    ) -> Result<TopkHungarianAssignResult> {
        let (q, g) = (pred_scores.size()[0], gt_bboxes.size()[0]);
        let (scores, boxes) = (pred_scores.f_detach()?, decode_bboxes.f_detach()?);
        let dev = scores.device();
        if g == 0 {
            return Ok(TopkHungarianAssignResult {
                num_gts: 0,
                gt_inds: Tensor::f_zeros([q], (Kind::Int64, dev))?,
                labels: Tensor::f_full([q], -1, (Kind::Int64, dev))?,
                max_overlaps: Tensor::f_zeros([0], (scores.kind(), dev))?,
                assign_metrics: Tensor::f_zeros([0], (scores.kind(), dev))?,
            });
        }
        let overlaps = bbox_overlaps(&boxes, gt_bboxes, false)?;
        let alignment = scores
            .f_index_select(1, gt_labels)?
            .f_pow_tensor_scalar(alpha)?
            .f_mul(&overlaps.f_pow_tensor_scalar(beta)?)?;
        let cost = self
            .cls_cost
            .cost(&scores, gt_labels)?
            .f_add(&self.reg_cost.cost(&boxes, gt_bboxes, img_shape)?)?
            .f_add(&self.iou_cost.cost(&boxes, gt_bboxes)?)?;
        let topk = self.topk.min(q / g);
        // Each ground truth's column repeated `topk` times: column j * topk + t is ground truth j.
        let repeated = cost
            .f_unsqueeze(-1)?
            .f_repeat([1, 1, topk])?
            .f_view([q, g * topk])?;
        let host: Vec<f64> = Vec::try_from(
            repeated
                .f_to_kind(Kind::Double)?
                .f_to_device(Device::Cpu)?
                .f_view([-1])?,
        )?;
        let (rows, cols) = lsap::solve(q as usize, (g * topk) as usize, &host, false).map_err(
            |e| anyhow::anyhow!("{NAME}: linear_sum_assignment failed ({e:?}): the cost matrix has NaN or infinite entries"),
        )?;
        let rows: Vec<i64> = rows.into_iter().map(|r| r as i64).collect();
        let gts: Vec<i64> = cols.into_iter().map(|c| c as i64 / topk.max(1)).collect();
        let candidates = Tensor::f_from_slice(&rows)?.f_to_device(dev)?;
        let matched = Tensor::f_from_slice(&gts)?.f_to_device(dev)?;
        let gt_inds = Tensor::f_zeros([q], (Kind::Int64, dev))?.f_index_put(
            &[Some(&candidates)],
            &matched.f_add_scalar(1)?,
            false,
        )?;
        let labels = Tensor::f_full([q], -1, (Kind::Int64, dev))?.f_index_put(
            &[Some(&candidates)],
            &gt_labels.f_index_select(0, &matched)?,
            false,
        )?;
        let max_overlaps = crate::losses::iou::bbox_overlaps_aligned(
            &boxes.f_index_select(0, &candidates)?,
            &gt_bboxes.f_index_select(0, &matched)?,
            false,
            1e-6,
        )?;
        let assign_metrics = alignment
            .f_index_select(0, &candidates)?
            .f_gather(1, &matched.f_unsqueeze(1)?, false)?
            .f_view([-1])?;
        Ok(TopkHungarianAssignResult {
            num_gts: g,
            gt_inds,
            labels,
            max_overlaps,
            assign_metrics,
        })
    }
}

/// The checks of one image's assigner inputs; returns `C`.
pub(crate) fn check_image(
    who: &str,
    scores: &Tensor,
    boxes: &Tensor,
    gt_bboxes: &Tensor,
    gt_labels: &Tensor,
) -> Result<i64> {
    let ss = scores.size();
    ensure!(
        ss.len() == 2 && boxes.size() == [ss[0], 4],
        "{who}: scores must be (Q, C) and boxes (Q, 4), got {ss:?} and {:?}",
        boxes.size()
    );
    let g = gt_labels.size();
    ensure!(
        g.len() == 1 && gt_bboxes.size() == [g[0], 4],
        "{who}: gt_bboxes must be (G, 4) and gt_labels (G,), got {:?} and {g:?}",
        gt_bboxes.size()
    );
    ensure!(
        gt_labels.kind() == Kind::Int64,
        "{who}: gt_labels must be int64, got {:?}",
        gt_labels.kind()
    );
    ensure!(
        gt_bboxes.kind() == boxes.kind(),
        "{who}: gt_bboxes are {:?}, the boxes {:?}",
        gt_bboxes.kind(),
        boxes.kind()
    );
    for (what, t) in [
        ("boxes", boxes),
        ("gt_bboxes", gt_bboxes),
        ("gt_labels", gt_labels),
    ] {
        ensure!(
            t.device() == scores.device(),
            "{who}: {what} on {:?}, scores on {:?}",
            t.device(),
            scores.device()
        );
    }
    let c = ss[1];
    if g[0] > 0 {
        // MMDetection indexes the scores with the labels (`pred_scores[:, gt_labels]`).
        let (lo, hi) = (
            gt_labels.f_min()?.f_int64_value(&[])?,
            gt_labels.f_max()?.f_int64_value(&[])?,
        );
        ensure!(
            lo >= 0 && hi < c,
            "{who}: gt_labels must lie in [0, {c}), got values in [{lo}, {hi}]"
        );
    }
    Ok(c)
}
