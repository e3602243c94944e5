//! MMDetection's `TaskAlignedAssigner` (`task_aligned_assigner.py`, TOOD), batched over images.

use anyhow::Result;
use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use super::{
    bbox_overlaps, centres, check_predictions, check_topk_and_iou, gt_chunk, keep_better, setup,
    AssignResult, GtBatch, CHUNK_ELEMENTS,
};
use crate::registry::parse_config;
use crate::task_modules::promote_kinds;

/// MMDetection's `INF` of the assigner: `max_overlaps` is `-INF` at every prior it leaves
/// negative.
const INF: f64 = 100_000_000.0;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    topk: i64,
    #[serde(default)]
    iou_calculator: Option<Value>,
}

/// MMDetection's `TaskAlignedAssigner`: per ground truth, the `topk` priors of largest alignment
/// metric `score^alpha * IoU^beta` (the predicted score of the ground truth's class and the IoU
/// of the decoded prediction) are candidates; those with a positive metric whose prior centre
/// lies inside the box by more than 0.01 are positive; a prior claimed by several ground truths
/// goes to the highest IoU (the first on ties).
///
/// As MMDetection's, `max_overlaps` is -1e8 at every prior that is not positive (0 in an image
/// without ground truths), and the result carries each positive's alignment metric.
///
/// ```
/// use tch::Tensor;
/// use tch_detloss::task_modules::{GtBatch, TaskAlignedAssigner};
///
/// let a = TaskAlignedAssigner::from_config(&serde_json::json!({"type": "TaskAlignedAssigner", "topk": 2}))?;
/// let priors = Tensor::from_slice(&[0.0f32, 0.0, 10.0, 10.0, 20.0, 20.0, 30.0, 30.0]).view([2, 4]);
/// let decoded = priors.unsqueeze(0);
/// let scores = Tensor::from_slice(&[0.9f32, 0.1, 0.2, 0.8]).view([1, 2, 2]);
/// let gts = GtBatch::pad(&[Tensor::from_slice(&[1.0f32, 1.0, 11.0, 11.0]).view([1, 4])], &[Tensor::from_slice(&[0i64])])?;
/// let r = a.assign(&priors, &decoded, &scores, &gts, 1.0, 6.0, None)?;
/// assert_eq!(Vec::<i64>::try_from(r.result.gt_inds.view([-1]))?, [1, 0]);
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug)]
pub struct TaskAlignedAssigner {
    /// Candidates per ground truth.
    pub topk: i64,
    /// The largest `(B, N, ground truths)` intermediate, in elements (results do not depend on it).
    pub chunk_elements: i64,
}

/// A [`TaskAlignedAssigner`]'s result: the assignment and, per prior, the alignment metric of
/// its ground truth (0 where negative): MMDetection's `assign_metrics`.
#[derive(Debug)]
pub struct TaskAlignedAssignResult {
    /// The assignment.
    pub result: AssignResult,
    /// `(B, N)`: the positives' alignment metrics, 0 elsewhere.
    pub assign_metrics: Tensor,
}

impl TaskAlignedAssigner {
    /// Builds it from its config dict (`topk`; `iou_calculator` only the default
    /// `BboxOverlaps2D`).
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: Config = parse_config(config)?;
        check_topk_and_iou(c.topk, c.iou_calculator.as_ref(), "TaskAlignedAssigner")?;
        Ok(Self {
            topk: c.topk,
            chunk_elements: CHUNK_ELEMENTS,
        })
    }

    /// Assigns the priors `(N, 4)` of a batch given the decoded predictions `(B, N, 4)` and the
    /// predicted class scores `(B, N, C)` (TOOD passes sigmoid scores), with MMDetection's
    /// `alpha` and `beta` (TOOD's `train_cfg`: 1 and 6). `inside` `(B, N)`: priors outside are
    /// never candidates and come out ignored (-1), as when MMDetection passes only the inside
    /// ones.
    #[allow(clippy::too_many_arguments)]
    pub fn assign(
        &self,
        priors: &Tensor,
        decoded: &Tensor,
        scores: &Tensor,
        gts: &GtBatch,
        alpha: f64,
        beta: f64,
        inside: Option<&Tensor>,
    ) -> Result<TaskAlignedAssignResult> {
        let st = setup("TaskAlignedAssigner", priors, gts, inside)?;
        let (b, g, n, dev) = (st.b, st.g, st.n, st.dev);
        let classes = check_predictions("TaskAlignedAssigner", decoded, scores, b, n)?;
        // The dtypes torch's promotion gives MMDetection's overlaps and metrics.
        let overlap_kind = promote_kinds(&[decoded.kind(), gts.bboxes.kind()]);
        let metric_kind = promote_kinds(&[scores.kind(), overlap_kind]);
        let mut best = Tensor::f_full([b, n], -INF, (overlap_kind, dev))?;
        let mut best_gt = Tensor::f_zeros([b, n], (Kind::Int64, dev))?;
        let mut metrics = Tensor::f_zeros([b, n], (metric_kind, dev))?;
        if g > 0 && n > 0 {
            let pc = centres(priors);
            let chunk = gt_chunk(b, n, g, self.chunk_elements);
            let mut g0 = 0;
            while g0 < g {
                let w = chunk.min(g - g0);
                let boxes = gts.bboxes.narrow(1, g0, w);
                let valid = gts.valid.narrow(1, g0, w);
                let overlaps = bbox_overlaps(decoded, &boxes, false)?.f_detach()?; // (B, N, w)
                let labels = gts
                    .labels
                    .narrow(1, g0, w)
                    .f_clamp(0, classes - 1)?
                    .f_unsqueeze(1)?
                    .f_expand([b, n, w], false)?;
                let bbox_scores = scores.f_detach()?.f_gather(2, &labels, false)?;
                let mut align =
                    bbox_scores.f_pow_tensor_scalar(alpha)? * overlaps.f_pow_tensor_scalar(beta)?;
                if let Some(out) = &st.outside {
                    align = align.f_masked_fill(&out.unsqueeze(2), f64::NEG_INFINITY)?;
                }
                let k = self.topk.min(n);
                let (cand_metric, cand) = align.f_topk(k, 1, true, true)?; // (B, k, w)
                let mut is_pos = cand_metric.f_gt(0.0)?;
                let flat = cand.f_flatten(0, -1)?;
                let px = pc.select(1, 0).f_index_select(0, &flat)?.f_view_as(&cand)?;
                let py = pc.select(1, 1).f_index_select(0, &flat)?.f_view_as(&cand)?;
                let side = |j: i64| boxes.select(2, j).unsqueeze(1);
                let sides = Tensor::f_stack(
                    &[&px - side(0), &py - side(1), side(2) - &px, side(3) - &py],
                    0,
                )?;
                is_pos = is_pos
                    .f_logical_and(&sides.f_amin([0i64].as_slice(), false)?.f_gt(0.01)?)?
                    .f_logical_and(&valid.unsqueeze(1))?;
                let pos =
                    Tensor::f_zeros([b, n, w], (Kind::Bool, dev))?.f_scatter(1, &cand, &is_pos)?;
                let masked = overlaps.f_masked_fill(&pos.f_logical_not()?, -INF)?;
                let (vals, idx) = masked.f_max_dim(2, false)?;
                let chunk_metric = align
                    .f_gather(2, &idx.unsqueeze(2), false)?
                    .f_squeeze_dim(2)?;
                let better = vals.f_gt_tensor(&best)?;
                metrics = chunk_metric
                    .f_to_kind(metric_kind)?
                    .f_where_self(&better, &metrics)?;
                keep_better(&mut best, &mut best_gt, &vals, &idx, g0)?;
                g0 += w;
            }
        }
        let positive = best.f_ne(-INF)?;
        let gt_inds = (&best_gt + 1).f_where_scalarother(&positive, 0)?;
        let assign_metrics = metrics.f_where_scalarother(&positive, 0.0)?;
        let result = st.finish(gt_inds, best, &gts.labels)?;
        Ok(TaskAlignedAssignResult {
            result,
            assign_metrics,
        })
    }
}
