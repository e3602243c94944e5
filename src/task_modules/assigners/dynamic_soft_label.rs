//! MMDetection's `DynamicSoftLabelAssigner` (`dynamic_soft_label_assigner.py`, RTMDet),
//! batched over images.

use anyhow::{ensure, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::{
    bbox_overlaps, centres, check_predictions, check_topk_and_iou, gt_chunk, inside_gap,
    AssignResult, GtBatch, CHUNK_ELEMENTS,
};
use crate::registry::parse_config;
use crate::task_modules::promote_kinds;

/// MMDetection's `INF` and `EPS` of the assigner.
const INF: f64 = 100_000_000.0;
const EPS: f64 = 1.0e-7;

/// On the CPU the scored rows are padded to a multiple of this many (see
/// `DynamicSoftLabelAssigner::pairwise`).
const ROW_ALIGN: i64 = 256;

/// On the CPU the `(rows, G, C)` classification terms are laid out and summed in blocks of at
/// most this many elements (4 MiB of float32, which stays in the cache between the two passes).
const CPU_BLOCK_ELEMENTS: i64 = 1 << 20;

/// Per `(B, G)` row of costs `(B, G, N)`, its first `dynamic_k` `(B, G)` entries in the order of a
/// stable ascending sort (NaN after everything, ties in index order), `(B, G, N)` bool; every
/// `dynamic_k` at most `k`. From the `k` cheapest (one `topk`), the `dynamic_k`-th cost: all
/// entries that cost less, then the earliest of those that cost as much.
fn first_cheapest(cost: &Tensor, dynamic_k: &Tensor, k: i64) -> Result<Tensor> {
    let (cheapest, _) = cost.f_topk(k, 2, false, true)?; // (B, G, k), ascending
    let kth = cheapest.f_gather(2, &(dynamic_k - 1).f_unsqueeze(2)?, false)?; // (B, G, 1)
    let (kth_nan, cost_nan) = (kth.f_isnan()?, cost.f_isnan()?);
    let less = cost_nan
        .f_logical_not()?
        .f_where_self(&kth_nan, &cost.f_lt_tensor(&kth)?)?;
    let tie = cost_nan.f_where_self(&kth_nan, &cost.f_eq_tensor(&kth)?)?;
    let room = dynamic_k - less.f_sum_dim_intlist(2, false, Kind::Int64)?; // (B, G)
    Ok(tie
        .f_cumsum(2, Kind::Int64)?
        .f_le_tensor(&room.f_unsqueeze(2)?)?
        .f_logical_and(&tie)?
        .f_logical_or(&less)?)
}

/// Each ground truth's dynamic k from the IoUs `(B, G, N)`: its `k` largest summed, truncated
/// to an integer and at least 1, `(B, G)` int64. The sum runs over a `(B, k, G)` tensor, the
/// layout in which MMDetection's `topk(pairwise_ious, k, dim=0).sum(0)` (and this assigner, over
/// `(B, N, G)` IoUs) sums it, so that it rounds the same.
fn dynamic_ks(iou: &Tensor, k: i64) -> Result<Tensor> {
    let (top, _) = iou.f_topk(k, 2, true, true)?; // (B, G, k), descending
    Ok(top
        .f_permute([0, 2, 1])?
        .f_contiguous()?
        .f_sum_dim_intlist(1, false, None::<Kind>)?
        .f_to_kind(Kind::Int)?
        .f_clamp_min(1)?
        .f_to_kind(Kind::Int64)?)
}

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
        check_predictions("DynamicSoftLabelAssigner", decoded, scores, b, n)?;
        if let Some(m) = inside {
            ensure!(
                m.size() == [b, n] && m.kind() == Kind::Bool,
                "DynamicSoftLabelAssigner: inside must be bool [{b}, {n}], got {:?} {:?}",
                m.size(),
                m.kind()
            );
        }
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
        // Every (B, G, N) tensor below runs along the priors, the last and contiguous dimension.
        let candidate = self.candidates(priors, gts, inside)?; // (B, N)
        let num_valid = candidate.f_sum_dim_intlist(1, false, Kind::Int64)?;
        let (cost, iou) = self.pairwise(priors, decoded, scores, gts, &candidate)?; // (B, G, N)

        // Dynamic k per ground truth: the sum of its top-topk candidate IoUs, truncated, at
        // least 1 (the non-candidates' zeros add nothing). At most k.
        let k = self.topk.min(n);
        let dynamic_k = dynamic_ks(&iou, k)?; // (B, G) int64

        // Each ground truth takes its dynamic_k cheapest candidates.
        let cheapest_k = first_cheapest(&cost, &dynamic_k, k)?;
        let valid_gt = gts.valid.unsqueeze(2);
        let matching = cheapest_k
            .f_logical_and(&candidate.unsqueeze(1))?
            .f_logical_and(&valid_gt)?;
        let count = matching.f_sum_dim_intlist(1, false, Kind::Int64)?; // (B, N)

        // A prior taken by several: its cheapest ground truth over all of them.
        let (_, cheapest) = cost.f_min_dim(1, false)?;
        let (_, taken) = matching.f_to_kind(Kind::Uint8)?.f_max_dim(1, false)?;
        let gt_idx = cheapest.f_where_self(&count.f_gt(1)?, &taken)?;
        let fg = count.f_gt(0)?;
        let matched_iou = iou
            .f_gather(1, &gt_idx.unsqueeze(1), false)?
            .f_squeeze_dim(1)?;
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

    /// The candidates `(B, N)`: priors whose point lies inside some real ground truth (strictly,
    /// on every side) and inside the image where `inside` is given.
    fn candidates(
        &self,
        priors: &Tensor,
        gts: &GtBatch,
        inside: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, g) = (gts.bboxes.size()[0], gts.bboxes.size()[1]);
        let n = priors.size()[0];
        let point = |j: i64| priors.select(1, j).view([1, 1, n]);
        let (px, py) = (point(0), point(1));
        let chunk = gt_chunk(b, n * 4, g, self.chunk_elements);
        let mut candidate = Tensor::f_zeros([b, n], (Kind::Bool, priors.device()))?;
        let mut g0 = 0;
        while g0 < g {
            let w = chunk.min(g - g0);
            let boxes = gts.bboxes.narrow(1, g0, w);
            let inside = inside_gap(&px, &py, &boxes, 2)? // (B, w, N)
                .f_gt(0.0)?
                .f_logical_and(&gts.valid.narrow(1, g0, w).unsqueeze(2))?;
            candidate = candidate.f_logical_or(&inside.f_any_dim(1, false)?)?;
            g0 += w;
        }
        Ok(match inside {
            Some(m) => candidate.f_logical_and(m)?,
            None => candidate,
        })
    }

    /// The cost matrix and the IoUs of a batch, `(B, G, N)` each: the cost +inf and the IoU 0
    /// wherever the prior is no candidate (and the cost +inf for padding ground truths).
    ///
    /// MMDetection's soft classification cost sums, over the classes, `BCE(x, t) * |t - σ(x)|²`
    /// with the soft label `t` the IoU at the ground truth's class and 0 at every other. Each
    /// term at `t = 0` depends on the prior alone, so it is computed once per (prior, class),
    /// and once per (prior, ground truth) at the ground truth's class; the `(rows, G, C)` terms
    /// are then laid out (a copy and a scatter, in blocks of rows that stay in the cache) and
    /// summed by the torch reduction that sums the direct composition, which gives the same
    /// bits: every term is the same IEEE expression of the same values (`(1 - t) * x - logσ(x)`
    /// and `(t - σ(x))²` as `binary_cross_entropy_with_logits` and `pow(2)` compute them), σ is
    /// evaluated on a broadcast layout as the direct composition evaluates it (torch's CPU
    /// kernels run vector code over the first whole vectors of each row of classes and scalar
    /// code over the rest), and each sum runs over one row of classes.
    ///
    /// On the CPU only the candidate priors are scored: their rows are picked with a `nonzero`
    /// on host memory (no device to wait for) and padded with copies of the first to a multiple
    /// of [`ROW_ALIGN`], so that torch's elementwise passes over `(rows, G)` run whole vectors
    /// and split evenly between up to 8 threads (scalar tails round differently). On other
    /// devices every prior is scored and nothing is read back.
    fn pairwise(
        &self,
        priors: &Tensor,
        decoded: &Tensor,
        scores: &Tensor,
        gts: &GtBatch,
        candidate: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, n, c) = (scores.size()[0], scores.size()[1], scores.size()[2]);
        let g = gts.bboxes.size()[1];
        let dev = priors.device();
        let on_cpu = dev == Device::Cpu;
        // The scored rows of the flattened (B * N) priors (all of them: None), and how many of
        // them are real.
        let (rows, real) = if on_cpu {
            let picked = candidate.f_view([-1])?.f_nonzero()?.f_view([-1])?;
            let real = picked.size()[0];
            let padded = (real + ROW_ALIGN - 1) / ROW_ALIGN * ROW_ALIGN;
            let pad = picked
                .f_narrow(0, 0, real.min(1))?
                .f_expand([padded - real], false)?;
            (Some(Tensor::f_cat(&[&picked, &pad], 0)?), real)
        } else {
            (None, b * n)
        };
        let iou_kind = promote_kinds(&[decoded.kind(), gts.bboxes.kind()]);
        // The dtype of the classification terms: the soft labels' (the IoUs') with the logits'.
        let cost_kind = promote_kinds(&[iou_kind, scores.kind()]);
        let (cost, iou) =
            if real == 0 {
                (
                    Tensor::f_full([b * n, g], f64::INFINITY, (cost_kind, dev))?,
                    Tensor::f_zeros([b * n, g], (iou_kind, dev))?,
                )
            } else {
                let all = Tensor::f_arange(b * n, (Kind::Int64, dev))?;
                let rows_or_all = rows.as_ref().unwrap_or(&all);
                let image = rows_or_all.f_div_scalar_mode(n, "floor")?;
                let prior = rows_or_all.f_remainder(n)?;
                let pick = |t: &Tensor| -> Result<Tensor> {
                    Ok(match &rows {
                        Some(r) => t.f_index_select(0, r)?,
                        None => t.shallow_clone(),
                    })
                };
                let x = pick(&scores.f_reshape([b * n, c])?)?; // (R, C)
                let pred = pick(&decoded.f_reshape([b * n, 4])?)?; // (R, 4)
                let r = x.size()[0];
                let point = priors.f_index_select(0, &prior)?; // (R, 4)
                let boxes = gts.bboxes.f_index_select(0, &image)?; // (R, G, 4)
                let labels = gts.labels.f_clamp(0, c - 1)?.f_index_select(0, &image)?; // (R, G)

                // Per (row, ground truth): the IoU, its cost and the soft centre prior.
                let overlaps =
                    bbox_overlaps(&pred.f_unsqueeze(1)?, &boxes, false)?.f_squeeze_dim(1)?;
                let iou_cost = (&overlaps + EPS).f_log()?.f_neg()? * self.iou_weight;
                let distance = (point.f_narrow(1, 0, 2)?.f_unsqueeze(1)? - centres(&boxes))
                    .f_pow_tensor_scalar(2)?
                    .f_sum_dim_intlist(-1, false, None::<Kind>)?
                    .f_sqrt()?
                    / point.f_narrow(1, 2, 1)?;
                let soft_center = Tensor::f_pow_scalar(10, &(distance - self.soft_center_radius))?;

                // σ(x) on a broadcast (R, 2, C) layout (see above), log σ(x) (torch always makes its
                // input contiguous for it), both promoted as the direct composition promotes them.
                let sig = x
                    .f_unsqueeze(1)?
                    .f_expand([r, 2, c], false)?
                    .f_sigmoid()?
                    .f_select(1, 0)?
                    .f_to_kind(cost_kind)?;
                let log_sig = x.f_log_sigmoid()?.f_to_kind(cost_kind)?;
                let xk = x.f_to_kind(cost_kind)?;
                // The terms at t = 0: ((1 - 0) * x - logσ(x)) * |0 - σ(x)|².
                let background = (&xk - &log_sig) * sig.f_pow_tensor_scalar(2.0)?; // (R, C)
                                                                                   // At the ground truth's class, t = IoU: ((1 - t) * x - logσ(x)) * |t - σ(x)|².
                let at = |t: &Tensor| t.f_gather(1, &labels, false);
                let t = overlaps.f_to_kind(cost_kind)?;
                let own = ((t.f_neg()? + 1.0) * at(&xk)? - at(&log_sig)?)
                    * (&t - at(&sig)?).f_abs()?.f_pow_tensor_scalar(2.0)?; // (R, G)

                // The (rows, gts, C) terms, block by block, summed over the classes.
                let elements = if on_cpu {
                    self.chunk_elements.min(CPU_BLOCK_ELEMENTS)
                } else {
                    self.chunk_elements
                };
                let w = gt_chunk(1, c, g, elements);
                let block = (elements / (w * c)).clamp(1, r);
                let mut per_gt = Vec::new();
                let mut g0 = 0;
                while g0 < g {
                    let w = w.min(g - g0);
                    let mut per_row = Vec::new();
                    let mut r0 = 0;
                    while r0 < r {
                        let rb = block.min(r - r0);
                        let mut terms = Tensor::f_empty([rb, w, c], (cost_kind, dev))?;
                        terms.f_copy_(
                            &background
                                .f_narrow(0, r0, rb)?
                                .f_unsqueeze(1)?
                                .f_expand([rb, w, c], false)?,
                        )?;
                        let _ = terms.f_scatter_(
                            2,
                            &labels
                                .f_narrow(0, r0, rb)?
                                .f_narrow(1, g0, w)?
                                .f_unsqueeze(2)?,
                            &own.f_narrow(0, r0, rb)?
                                .f_narrow(1, g0, w)?
                                .f_unsqueeze(2)?,
                        )?;
                        per_row.push(terms.f_sum_dim_intlist(-1, false, None::<Kind>)?);
                        r0 += rb;
                    }
                    per_gt.push(Tensor::f_cat(&per_row, 0)?);
                    g0 += w;
                }
                let scored = Tensor::f_cat(&per_gt, 1)? + iou_cost + soft_center;
                match &rows {
                    None => (scored, overlaps),
                    Some(rows) => {
                        let keep = rows.f_narrow(0, 0, real)?;
                        let into =
                            |t: &Tensor, fill: f64| -> Result<Tensor> {
                                Ok(Tensor::f_full([b * n, g], fill, (t.kind(), dev))?
                                    .f_index_copy(0, &keep, &t.f_narrow(0, 0, real)?)?)
                            };
                        (into(&scored, f64::INFINITY)?, into(&overlaps, 0.0)?)
                    }
                }
            };
        let along_priors = |t: Tensor| -> Result<Tensor> {
            Ok(t.f_view([b, n, g])?.f_permute([0, 2, 1])?.f_contiguous()?)
        };
        let (cost, iou) = (along_priors(cost)?, along_priors(iou)?);
        let usable = candidate
            .f_unsqueeze(1)?
            .f_logical_and(&gts.valid.f_unsqueeze(2)?)?;
        Ok((
            cost.f_masked_fill(&usable.f_logical_not()?, f64::INFINITY)?,
            iou.f_masked_fill(&candidate.f_unsqueeze(1)?.f_logical_not()?, 0.0)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct composition of MMDetection's cost over every (image, prior, ground truth,
    /// class), as the assigner computed it before the per-prior terms were shared.
    fn direct(
        a: &DynamicSoftLabelAssigner,
        priors: &Tensor,
        decoded: &Tensor,
        scores: &Tensor,
        gts: &GtBatch,
    ) -> (Tensor, Tensor) {
        let (b, n, c) = (scores.size()[0], scores.size()[1], scores.size()[2]);
        let g = gts.bboxes.size()[1];
        let centre = priors.narrow(1, 0, 2).view([1, n, 1, 2]);
        let strides = priors.select(1, 2).view([1, n, 1]);
        let iou = bbox_overlaps(decoded, &gts.bboxes, false).unwrap();
        let distance = (&centre - centres(&gts.bboxes).unsqueeze(1))
            .pow_tensor_scalar(2)
            .sum_dim_intlist(-1, false, None::<Kind>)
            .sqrt()
            / &strides;
        let soft_center = Tensor::pow_scalar(10, &(distance - a.soft_center_radius));
        let iou_cost = (&iou + EPS).log().neg() * a.iou_weight;
        let onehot = gts
            .labels
            .clamp(0, c - 1)
            .one_hot(c)
            .to_kind(Kind::Float)
            .unsqueeze(1);
        let logits = scores.unsqueeze(2).expand([b, n, g, c], false);
        let soft_label = onehot * iou.unsqueeze(-1);
        let scale = (&soft_label - logits.sigmoid())
            .abs()
            .pow_tensor_scalar(2.0);
        let cls = logits
            .binary_cross_entropy_with_logits::<Tensor>(
                &soft_label,
                None,
                None,
                tch::Reduction::None,
            )
            .f_mul(&scale)
            .unwrap()
            .sum_dim_intlist(-1, false, None::<Kind>);
        (cls + iou_cost + soft_center, iou)
    }

    /// Bits of a float32 tensor, comparable with `equal`.
    fn bits(t: &Tensor) -> Tensor {
        t.view_dtype(Kind::Int)
    }

    #[test]
    fn shared_terms_give_the_direct_composition_bit_for_bit() {
        tch::manual_seed(3);
        let a = DynamicSoftLabelAssigner::from_config(
            &serde_json::json!({"type": "DynamicSoftLabelAssigner"}),
        )
        .unwrap();
        // B * N * G a multiple of the vector width (the direct composition's elementwise passes
        // then run whole vectors too) and below torch's grain size (one thread).
        let (b, n, g, c) = (2i64, 320i64, 5i64, 80i64);
        let f = (Kind::Float, Device::Cpu);
        let xy = Tensor::rand([n, 2], f) * 100.0;
        let priors = Tensor::cat(&[xy.shallow_clone(), Tensor::full([n, 2], 8.0, f)], 1);
        let wh = Tensor::rand([b, n, 2], f) * 30.0 + 1.0;
        let decoded = Tensor::cat(
            &[xy.unsqueeze(0) - &wh / 2.0, xy.unsqueeze(0) + &wh / 2.0],
            2,
        );
        let scores = Tensor::randn([b, n, c], f) * 2.0 - 3.0;
        let lo = Tensor::rand([b, g, 2], f) * 70.0;
        let hi = &lo + Tensor::rand([b, g, 2], f) * 40.0 + 5.0;
        let boxes = Tensor::cat(&[&lo, &hi], 2);
        let boxes: Vec<Tensor> = (0..b).map(|i| boxes.get(i)).collect();
        let labels: Vec<Tensor> = (0..b)
            .map(|_| Tensor::randint(c, [g], (Kind::Int64, Device::Cpu)))
            .collect();
        let gts = GtBatch::pad(&boxes, &labels).unwrap();
        let candidate = Tensor::rand([b, n], f).lt(0.6);
        let (want_cost, want_iou) = direct(&a, &priors, &decoded, &scores, &gts);
        let along_priors = |t: Tensor| t.permute([0, 2, 1]).contiguous();
        let (want_cost, want_iou) = (along_priors(want_cost), along_priors(want_iou));
        // One block, one ground truth and 3 rows per block, and 5 ground truths and 3 rows.
        for chunk in [CHUNK_ELEMENTS, 1, 3 * 5 * 80] {
            let a = DynamicSoftLabelAssigner {
                chunk_elements: chunk,
                ..a.clone()
            };
            let (cost, iou) = a
                .pairwise(&priors, &decoded, &scores, &gts, &candidate)
                .unwrap();
            let at = candidate.unsqueeze(1).expand([b, g, n], false);
            assert!(bits(&cost.masked_select(&at)).equal(&bits(&want_cost.masked_select(&at))));
            assert!(bits(&iou.masked_select(&at)).equal(&bits(&want_iou.masked_select(&at))));
            let out = at.logical_not();
            assert!(cost.masked_select(&out).isinf().all().int64_value(&[]) == 1);
            assert!(iou.masked_select(&out).eq(0.0).all().int64_value(&[]) == 1);
        }
    }

    #[test]
    fn first_cheapest_is_a_stable_sorts_head() {
        tch::manual_seed(5);
        let f = (Kind::Float, Device::Cpu);
        let (b, g, n, k) = (3i64, 7i64, 200i64, 13i64);
        // Few distinct values (many ties), some +inf, -inf and NaN.
        let mut cost = (Tensor::rand([b, g, n], f) * 6.0).floor();
        cost = cost.masked_fill(&Tensor::rand([b, g, n], f).lt(0.3), f64::INFINITY);
        cost = cost.masked_fill(&Tensor::rand([b, g, n], f).lt(0.05), f64::NEG_INFINITY);
        cost = cost.masked_fill(&Tensor::rand([b, g, n], f).lt(0.2), f64::NAN);
        // Rows of only NaN and of only +inf too.
        let _ = cost.get(0).get(0).fill_(f64::NAN);
        let _ = cost.get(0).get(1).fill_(f64::INFINITY);
        let dynamic_k = Tensor::randint_low(1, k + 1, [b, g], (Kind::Int64, Device::Cpu));
        let order = cost.argsort_stable(true, 2, false);
        let rank = order.zeros_like().scatter(
            2,
            &order,
            &Tensor::arange(n, (Kind::Int64, Device::Cpu))
                .view([1, 1, n])
                .expand_as(&order),
        );
        let want = rank.lt_tensor(&dynamic_k.unsqueeze(2));
        assert!(first_cheapest(&cost, &dynamic_k, k).unwrap().equal(&want));
    }

    #[test]
    fn dynamic_ks_sum_as_over_priors_by_gts() {
        tch::manual_seed(6);
        let (b, n, g, k) = (4i64, 3000i64, 30i64, 13i64);
        // IoUs near 1 so that the sums of 13 land near integers.
        let iou = (Tensor::rand([b, n, g], (Kind::Float, Device::Cpu)) * 0.02 + 0.98).masked_fill(
            &Tensor::rand([b, n, g], (Kind::Float, Device::Cpu)).lt(0.9),
            0.0,
        );
        let (top, _) = iou.topk(k, 1, true, true);
        let sums = top.sum_dim_intlist(1, false, None::<Kind>);
        let want = sums.to_kind(Kind::Int).clamp_min(1).to_kind(Kind::Int64);
        let got = dynamic_ks(&iou.permute([0, 2, 1]).contiguous(), k).unwrap();
        assert!(got.equal(&want));
    }
}
