//! MMDetection's `DynamicSoftLabelAssigner` (`dynamic_soft_label_assigner.py`, RTMDet),
//! batched over images.

use anyhow::{ensure, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use super::{
    bbox_overlaps, centres, check_predictions, check_topk_and_iou, gt_chunk, AssignResult, GtBatch,
    CHUNK_ELEMENTS,
};
use crate::registry::parse_config;

/// MMDetection's `INF` and `EPS` of the assigner.
const INF: f64 = 100_000_000.0;
const EPS: f64 = 1.0e-7;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "three")]
    soft_center_radius: f64,
    #[serde(default = "thirteen")]
    topk: i64,
    #[serde(default = "three")]
    iou_weight: f64,
    #[serde(default)]
    iou_calculator: Option<Value>,
}

fn three() -> f64 {
    3.0
}
fn thirteen() -> i64 {
    13
}

/// MMDetection's `DynamicSoftLabelAssigner`: the priors whose point lies inside a ground truth
/// are candidates; each pair's cost is the soft classification cost (BCE against the IoU as
/// soft label, scaled by the squared gap), `-log(IoU + 1e-7) * iou_weight` and the soft centre
/// prior `10^(distance / stride - soft_center_radius)`; each ground truth takes its
/// `max(1, ⌊Σ top-topk IoUs⌋)` cheapest candidates, and a prior taken by several goes to its
/// cheapest ground truth over all of them (the first on ties).
///
/// As MMDetection's: `max_overlaps` is float32, the matched IoU at positives and -1e8 elsewhere,
/// but 0 everywhere in an image with no candidate or no ground truth. One difference: MMDetection
/// returns those zeros in the predictions' dtype, image by image; a batch has one dtype, so they
/// are float32 unless no image has a ground truth.
///
/// ```
/// use tch::Tensor;
/// use tch_detloss::task_modules::{DynamicSoftLabelAssigner, GtBatch};
///
/// let a = DynamicSoftLabelAssigner::from_config(&serde_json::json!({"type": "DynamicSoftLabelAssigner", "topk": 13}))?;
/// // Points (x, y, stride_w, stride_h), their decoded boxes and class logits.
/// let priors = Tensor::from_slice(&[4.0f32, 4.0, 8.0, 8.0, 20.0, 20.0, 8.0, 8.0]).view([2, 4]);
/// let decoded = Tensor::from_slice(&[0.0f32, 0.0, 9.0, 9.0, 16.0, 16.0, 24.0, 24.0]).view([1, 2, 4]);
/// let scores = Tensor::from_slice(&[2.0f32, -1.0, -1.0, 0.5]).view([1, 2, 2]);
/// let gts = GtBatch::pad(&[Tensor::from_slice(&[0.0f32, 0.0, 10.0, 10.0]).view([1, 4])], &[Tensor::from_slice(&[0i64])])?;
/// let r = a.assign(&priors, &decoded, &scores, &gts, None)?;
/// assert_eq!(Vec::<i64>::try_from(r.gt_inds.view([-1]))?, [1, 0]);
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug)]
pub struct DynamicSoftLabelAssigner {
    /// The soft centre prior's radius, in strides.
    pub soft_center_radius: f64,
    /// The IoUs summed for each ground truth's dynamic k.
    pub topk: i64,
    /// The weight of the IoU cost.
    pub iou_weight: f64,
    /// The largest `(B, N, ground truths, classes)` intermediate, in elements (results do not
    /// depend on it).
    pub chunk_elements: i64,
}

impl DynamicSoftLabelAssigner {
    /// Builds it from its config dict (`soft_center_radius`, `topk`, `iou_weight`;
    /// `iou_calculator` only the default `BboxOverlaps2D`).
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: Config = parse_config(config)?;
        check_topk_and_iou(
            c.topk,
            c.iou_calculator.as_ref(),
            "DynamicSoftLabelAssigner",
        )?;
        Ok(Self {
            soft_center_radius: c.soft_center_radius,
            topk: c.topk,
            iou_weight: c.iou_weight,
            chunk_elements: CHUNK_ELEMENTS,
        })
    }

    /// Assigns the priors `(N, 4)` — points with strides, `(x, y, stride_w, stride_h)` — of a
    /// batch given the decoded predictions `(B, N, 4)` and the class logits `(B, N, C)`.
    /// `inside` `(B, N)`: priors outside are never candidates (as when MMDetection's heads pass
    /// only the inside ones) and come out negative.
    pub fn assign(
        &self,
        priors: &Tensor,
        decoded: &Tensor,
        scores: &Tensor,
        gts: &GtBatch,
        inside: Option<&Tensor>,
    ) -> Result<AssignResult> {
        let (b, g) = gts.dims()?;
        ensure!(
            priors.dim() == 2 && priors.size()[1] == 4 && priors.is_floating_point(),
            "DynamicSoftLabelAssigner: priors must be floating (N, 4) points with strides, got {:?} {:?}",
            priors.size(),
            priors.kind()
        );
        let n = priors.size()[0];
        let classes = check_predictions("DynamicSoftLabelAssigner", decoded, scores, b, n)?;
        if let Some(m) = inside {
            ensure!(
                m.size() == [b, n] && m.kind() == Kind::Bool,
                "DynamicSoftLabelAssigner: inside must be bool [{b}, {n}], got {:?} {:?}",
                m.size(),
                m.kind()
            );
        }
        let c = classes;
        let dev = priors.device();
        let num_gts = gts.valid.f_sum_dim_intlist(1, false, Kind::Int64)?;
        let zeros_i = Tensor::f_zeros([b, n], (Kind::Int64, dev))?;
        if g == 0 || n == 0 {
            return Ok(AssignResult {
                num_gts,
                gt_inds: zeros_i.f_zeros_like()?,
                // MMDetection's early return: zeros of the predictions' dtype.
                max_overlaps: Tensor::f_zeros([b, n], (decoded.kind(), dev))?,
                labels: zeros_i.f_full_like(-1)?,
            });
        }
        let centre = priors.narrow(1, 0, 2).view([1, n, 1, 2]);
        let strides = priors.select(1, 2).view([1, n, 1]);
        let gt_boxes = &gts.bboxes;
        let chunk = gt_chunk(b, n * c.max(4), g, self.chunk_elements);
        let chunks: Vec<(i64, i64)> = (0..g)
            .step_by(chunk as usize)
            .map(|g0| (g0, chunk.min(g - g0)))
            .collect();

        // Candidates: points inside some ground truth (strictly, on every side).
        let mut candidate = Tensor::f_zeros([b, n], (Kind::Bool, dev))?;
        for &(g0, w) in &chunks {
            let boxes = gt_boxes.narrow(1, g0, w).unsqueeze(1); // (B, 1, w, 4)
            let deltas = Tensor::f_cat(
                &[
                    &centre - boxes.narrow(-1, 0, 2),
                    boxes.narrow(-1, 2, 2) - &centre,
                ],
                -1,
            )?;
            let inside = deltas
                .f_amin([-1i64].as_slice(), false)?
                .f_gt(0.0)?
                .f_logical_and(&gts.valid.narrow(1, g0, w).unsqueeze(1))?;
            candidate = candidate.f_logical_or(&inside.f_any_dim(2, false)?)?;
        }
        if let Some(m) = inside {
            candidate = candidate.f_logical_and(m)?;
        }
        let num_valid = candidate.f_sum_dim_intlist(1, false, Kind::Int64)?;

        // The pairwise costs and IoUs of the candidates; +INF-like for the rest so that no
        // ground truth takes them and no prior prefers a padding entry.
        let mut costs = Vec::new();
        let mut ious = Vec::new();
        for &(g0, w) in &chunks {
            let boxes = gt_boxes.narrow(1, g0, w);
            let valid_gt = gts.valid.narrow(1, g0, w).unsqueeze(1);
            let iou = bbox_overlaps(decoded, &boxes, false)?; // (B, N, w)
            let gt_centre = centres(&boxes).unsqueeze(1);
            let distance = (&centre - gt_centre)
                .f_pow_tensor_scalar(2)?
                .f_sum_dim_intlist(-1, false, None::<Kind>)?
                .f_sqrt()?
                / &strides;
            let soft_center = Tensor::f_pow_scalar(10, &(distance - self.soft_center_radius))?;
            let iou_cost = (&iou + EPS).f_log()?.f_neg()? * self.iou_weight;
            let labels = gts.labels.narrow(1, g0, w).f_clamp(0, c - 1)?;
            let onehot = labels.f_one_hot(c)?.f_to_kind(Kind::Float)?.unsqueeze(1); // (B, 1, w, C)
            let logits = scores.unsqueeze(2).f_expand([b, n, w, c], false)?;
            let soft_label = onehot * iou.unsqueeze(-1);
            let scale = (&soft_label - logits.f_sigmoid()?)
                .f_abs()?
                .f_pow_tensor_scalar(2.0)?;
            let cls_cost = logits
                .f_binary_cross_entropy_with_logits::<Tensor>(
                    &soft_label,
                    None,
                    None,
                    tch::Reduction::None,
                )?
                .f_mul(&scale)?
                .f_sum_dim_intlist(-1, false, None::<Kind>)?;
            let cost = cls_cost + iou_cost + soft_center;
            let usable = candidate.unsqueeze(2).f_logical_and(&valid_gt)?;
            costs.push(cost.f_masked_fill(&usable.f_logical_not()?, f64::INFINITY)?);
            ious.push(iou.f_masked_fill(&candidate.unsqueeze(2).f_logical_not()?, 0.0)?);
        }
        let cost = Tensor::f_cat(&costs, 2)?;
        let iou = Tensor::f_cat(&ious, 2)?;

        // Dynamic k per ground truth: the sum of its top-topk candidate IoUs, truncated, at
        // least 1 (the non-candidates' zeros add nothing).
        let k = self.topk.min(n);
        let (top, _) = iou.f_topk(k, 1, true, true)?;
        let dynamic_k = top
            .f_sum_dim_intlist(1, false, None::<Kind>)?
            .f_to_kind(Kind::Int)?
            .f_clamp_min(1)?; // (B, G)
                              // Each ground truth takes its dynamic_k cheapest candidates.
        let order = cost.f_argsort_stable(true, 1, false)?;
        let rank = Tensor::f_zeros_like(&order)?.f_scatter(
            1,
            &order,
            &Tensor::f_arange(n, (Kind::Int64, dev))?
                .f_view([1, n, 1])?
                .f_expand_as(&order)?,
        )?;
        let valid_gt = gts.valid.unsqueeze(1);
        let matching = rank
            .f_lt_tensor(&dynamic_k.f_unsqueeze(1)?)?
            .f_logical_and(&candidate.unsqueeze(2))?
            .f_logical_and(&valid_gt)?;
        let count = matching.f_sum_dim_intlist(2, false, Kind::Int64)?;
        // A prior taken by several: its cheapest ground truth over all of them.
        let (_, cheapest) = cost.f_min_dim(2, false)?;
        let (_, taken) = matching.f_to_kind(Kind::Uint8)?.f_max_dim(2, false)?;
        let gt_idx = cheapest.f_where_self(&count.f_gt(1)?, &taken)?;
        let fg = count.f_gt(0)?;
        let matched_iou = iou
            .f_gather(2, &gt_idx.unsqueeze(2), false)?
            .f_squeeze_dim(2)?;
        let gt_inds = (&gt_idx + 1).f_where_self(&fg, &zeros_i)?;
        let labels = gts
            .labels
            .f_gather(1, &gt_idx, false)?
            .f_where_scalarother(&fg, -1)?;
        // float32 as MMDetection's; 0 in an image without candidates or ground truths.
        let max_overlaps = matched_iou
            .f_to_kind(Kind::Float)?
            .f_where_scalarother(&fg, -INF)?;
        let plain = num_valid
            .f_gt(0)?
            .f_logical_and(&num_gts.f_gt(0)?)?
            .unsqueeze(1);
        Ok(AssignResult {
            max_overlaps: max_overlaps.f_where_scalarother(&plain, 0.0)?,
            gt_inds: gt_inds.f_where_scalarother(&plain, 0)?,
            labels: labels.f_where_scalarother(&plain, -1)?,
            num_gts,
        })
    }
}
