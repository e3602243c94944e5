//! MMDetection's `TaskAlignedAssigner` (`task_aligned_assigner.py`, TOOD), batched over images.

use anyhow::Result;
use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use super::{
    bbox_overlaps, centres, check_predictions, check_topk_and_iou, gt_chunk, inside_gap, setup,
    AssignResult, GtBatch, CHUNK_ELEMENTS,
};
use crate::registry::parse_config;
use crate::task_modules::promote_kinds;

/// MMDetection's `INF` of the assigner: `max_overlaps` is `-INF` at every prior it leaves
/// negative.
const INF: f64 = 100_000_000.0;

/// The priors are padded to a multiple of this many (see `TaskAlignedAssigner::assign`).
const ALIGN: i64 = 256;

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
        let mut best = Tensor::f_full([b * n], -INF, (overlap_kind, dev))?;
        let mut best_gt = Tensor::f_zeros([b * n], (Kind::Int64, dev))?;
        let mut metrics = Tensor::f_zeros([b * n], (metric_kind, dev))?;
        if g > 0 && n > 0 {
            let pc = centres(priors);
            let k = self.topk.min(n);
            // The priors, padded to a multiple of ALIGN with empty boxes (IoU 0), so that the
            // elementwise passes over (B, w, N) run whole vectors and split evenly between up
            // to 8 threads (torch's scalar tails round `pow` differently).
            let padded = (n + ALIGN - 1) / ALIGN * ALIGN;
            let decoded = Tensor::f_cat(
                &[
                    &decoded.f_detach()?,
                    &Tensor::f_zeros([b, padded - n, 4], (decoded.kind(), dev))?,
                ],
                1,
            )?;
            // (B, 1, k): where each image's priors start in the flattened (B * N).
            let flat = (Tensor::f_arange(b, (Kind::Int64, dev))?.f_view([b, 1, 1])? * n)
                .f_expand([b, 1, k], false)?;
            let chunk = gt_chunk(b, padded, g, self.chunk_elements);
            let mut g0 = 0;
            while g0 < g {
                let w = chunk.min(g - g0);
                let boxes = gts.bboxes.narrow(1, g0, w);
                let valid = gts.valid.narrow(1, g0, w);
                // (B, w, N) along the priors: the IoUs, the scores of each ground truth's class,
                // the alignment metrics score^alpha * IoU^beta.
                let overlaps_padded = bbox_overlaps(&boxes, &decoded, false)?;
                let overlaps = overlaps_padded.f_narrow(2, 0, n)?;
                let labels = gts
                    .labels
                    .narrow(1, g0, w)
                    .f_clamp(0, classes - 1)?
                    .f_unsqueeze(1)?
                    .f_expand([b, n, w], false)?;
                let bbox_scores = scores
                    .f_detach()?
                    .f_gather(2, &labels, false)?
                    .f_permute([0, 2, 1])?;
                // torch's pow(x, 1) is a copy of x.
                let scores_alpha = if alpha == 1.0 {
                    bbox_scores
                } else {
                    bbox_scores.f_pow_tensor_scalar(alpha)?
                };
                let mut align = scores_alpha
                    * overlaps_padded
                        .f_pow_tensor_scalar(beta)?
                        .f_narrow(2, 0, n)?;
                if let Some(out) = &st.outside {
                    align = align.f_masked_fill(&out.unsqueeze(1), f64::NEG_INFINITY)?;
                }
                // Each ground truth's k best priors (B, w, k); positive: a positive metric, and
                // the prior's centre inside the box by more than 0.01 on every side.
                let (cand_metric, cand) = align.f_topk(k, 2, true, true)?;
                let px = pc
                    .select(1, 0)
                    .f_index_select(0, &cand.f_flatten(0, -1)?)?
                    .f_view_as(&cand)?;
                let py = pc
                    .select(1, 1)
                    .f_index_select(0, &cand.f_flatten(0, -1)?)?
                    .f_view_as(&cand)?;
                let is_pos = cand_metric
                    .f_gt(0.0)?
                    .f_logical_and(&inside_gap(&px, &py, &boxes, 2)?.f_gt(0.01)?)?
                    .f_logical_and(&valid.unsqueeze(2))?;
                // Per prior, the largest IoU among the positives that claim it, the first ground
                // truth on ties: an amax over the claims, then an amin of the ground truths
                // that reach it; these only replace the best so far where strictly larger.
                let slot = (&flat.f_expand([b, w, k], false)? + &cand).f_flatten(0, -1)?;
                let claim = overlaps
                    .f_gather(2, &cand, false)?
                    .f_where_scalarother(&is_pos, -INF)?
                    .f_flatten(0, -1)?;
                let top = Tensor::f_full([b * n], -INF, (overlap_kind, dev))?
                    .f_internal_scatter_reduce(0, &slot, &claim, "amax", true)?;
                let reaches = claim
                    .f_eq_tensor(&top.f_gather(0, &slot, false)?)?
                    .f_logical_and(&is_pos.f_flatten(0, -1)?)?;
                let gt_of = Tensor::f_arange_start(g0, g0 + w, (Kind::Int64, dev))?
                    .f_view([1, w, 1])?
                    .f_expand([b, w, k], false)?
                    .f_flatten(0, -1)?;
                let first = Tensor::f_full([b * n], g, (Kind::Int64, dev))?
                    .f_internal_scatter_reduce(
                        0,
                        &slot,
                        &gt_of.f_where_scalarother(&reaches, g)?,
                        "amin",
                        true,
                    )?;
                // The metric of each prior's winning pair (one per prior, the rest add 0).
                let wins = reaches
                    .f_logical_and(&gt_of.f_eq_tensor(&first.f_gather(0, &slot, false)?)?)?;
                let won = cand_metric
                    .f_to_kind(metric_kind)?
                    .f_flatten(0, -1)?
                    .f_where_scalarother(&wins, 0.0)?;
                let chunk_metric = Tensor::f_zeros([b * n], (metric_kind, dev))?
                    .f_internal_scatter_reduce(0, &slot, &won, "sum", true)?;
                let better = top.f_gt_tensor(&best)?;
                metrics = chunk_metric.f_where_self(&better, &metrics)?;
                best = top.f_where_self(&better, &best)?;
                best_gt = first.f_where_self(&better, &best_gt)?;
                g0 += w;
            }
        }
        let (best, best_gt, metrics) = (
            best.f_view([b, n])?,
            best_gt.f_view([b, n])?,
            metrics.f_view([b, n])?,
        );
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
