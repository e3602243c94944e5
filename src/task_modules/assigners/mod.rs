//! MMDetection's assigners (`mmdet/models/task_modules/assigners/`), batched over images
//! (all but [`TopkHungarianAssigner`], whose matching runs on the host one image at a time).
//!
//! Ground truths come padded to one count per batch, `(B, G, 4)` with a `(B, G)` validity mask,
//! and every result is a tensor over all priors, `(B, N)`, computed with tensor ops only: no
//! per-image or per-ground-truth loop and no read of a device value, so that an assigner runs
//! on the device inside a capturable training step. Anchors × ground truths is processed in
//! chunks of ground truths when it is large.

mod atss;
mod dynamic_soft_label;
mod match_cost;
mod max_iou;
mod task_aligned;
mod topk_hungarian;

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

pub use atss::ATSSAssigner;
pub use dynamic_soft_label::DynamicSoftLabelAssigner;
pub use match_cost::{BBoxL1Cost, FocalLossCost, IoUCost};
pub use max_iou::{MaxIoUAssigner, NegIouThr};
pub use task_aligned::{TaskAlignedAssignResult, TaskAlignedAssigner};
pub(crate) use topk_hungarian::check_image;
pub use topk_hungarian::{TopkHungarianAssignResult, TopkHungarianAssigner};

/// The default size, in elements, of one `(B, N, chunk of G)` intermediate: above it assigners
/// work through the ground truths in chunks (each assigner's `chunk_elements`).
pub const CHUNK_ELEMENTS: i64 = 1 << 24;

/// MMDetection's `AssignResult`, for a batch of images.
#[derive(Debug)]
pub struct AssignResult {
    /// Ground truths per image, `(B,)` int64 (the valid entries of the padded batch).
    pub num_gts: Tensor,
    /// `(B, N)` int64: -1 ignore, 0 negative, k > 0 the k-th ground truth of the image.
    pub gt_inds: Tensor,
    /// `(B, N)` in the priors' dtype: the IoU the assignment rests on (see each assigner).
    pub max_overlaps: Tensor,
    /// `(B, N)` int64: the class of the assigned ground truth, -1 where none.
    pub labels: Tensor,
}

impl AssignResult {
    /// MMDetection's `add_gt_`: the ground truths themselves put in front as proposals, each
    /// assigned to itself. Every `(B, N)` field becomes `(B, G + N)`; padding ground truths
    /// (`gt_valid` false) are entered as ignored (-1) so that no sampler takes them.
    pub fn add_gt(&self, gt_labels: &Tensor, gt_valid: &Tensor) -> Result<AssignResult> {
        let (b, g) = (gt_valid.size()[0], gt_valid.size()[1]);
        ensure!(
            gt_labels.size() == [b, g] && self.gt_inds.size()[0] == b,
            "add_gt: labels {:?} and validity {:?} for {} images",
            gt_labels.size(),
            gt_valid.size(),
            self.gt_inds.size()[0]
        );
        let dev = self.gt_inds.device();
        let own = Tensor::f_arange_start(1, g + 1, (Kind::Int64, dev))?.f_expand([b, g], false)?;
        let self_inds = own.f_where_scalarother(gt_valid, -1)?;
        let ones = Tensor::f_ones([b, g], (self.max_overlaps.kind(), dev))?;
        let labels = gt_labels.f_where_scalarother(gt_valid, -1)?;
        Ok(AssignResult {
            num_gts: self.num_gts.shallow_clone(),
            gt_inds: Tensor::f_cat(&[&self_inds, &self.gt_inds], 1)?,
            max_overlaps: Tensor::f_cat(&[&ones, &self.max_overlaps], 1)?,
            labels: Tensor::f_cat(&[&labels, &self.labels], 1)?,
        })
    }

    /// One image's result as MMDetection's per-image `AssignResult` fields: `gt_inds`,
    /// `max_overlaps` and `labels`, each `(N,)`.
    pub fn image(&self, i: i64) -> (Tensor, Tensor, Tensor) {
        (
            self.gt_inds.get(i),
            self.max_overlaps.get(i),
            self.labels.get(i),
        )
    }
}

/// Padded ground truths of a batch: boxes `(B, G, 4)`, labels `(B, G)` int64 and which entries
/// are real, `(B, G)` bool.
#[derive(Debug)]
pub struct GtBatch {
    /// `(B, G, 4)` xyxy boxes; padding entries may hold anything finite.
    pub bboxes: Tensor,
    /// `(B, G)` int64 class indices.
    pub labels: Tensor,
    /// `(B, G)` bool: true for a real ground truth.
    pub valid: Tensor,
}

impl GtBatch {
    /// Pads per-image ground truths (`(G_i, 4)` boxes and `(G_i,)` labels) to the largest
    /// count. Reads only shapes, never values.
    pub fn pad(bboxes: &[Tensor], labels: &[Tensor]) -> Result<GtBatch> {
        ensure!(
            !bboxes.is_empty() && bboxes.len() == labels.len(),
            "GtBatch::pad: {} box tensors and {} label tensors",
            bboxes.len(),
            labels.len()
        );
        for (i, (b, l)) in bboxes.iter().zip(labels).enumerate() {
            ensure!(
                b.dim() == 2 && b.size()[1] == 4 && l.size() == [b.size()[0]],
                "GtBatch::pad: image {i}: boxes {:?} and labels {:?}",
                b.size(),
                l.size()
            );
        }
        let g = bboxes.iter().map(|b| b.size()[0]).max().unwrap_or(0);
        let (kind, dev) = (bboxes[0].kind(), bboxes[0].device());
        let mut bs = Vec::new();
        let mut ls = Vec::new();
        let mut vs = Vec::new();
        for (b, l) in bboxes.iter().zip(labels) {
            let n = b.size()[0];
            let pad_b = Tensor::f_zeros([g - n, 4], (kind, dev))?;
            bs.push(Tensor::f_cat(&[&b.f_to_kind(kind)?, &pad_b], 0)?);
            let pad_l = Tensor::f_zeros([g - n], (Kind::Int64, dev))?;
            ls.push(Tensor::f_cat(&[&l.f_to_kind(Kind::Int64)?, &pad_l], 0)?);
            vs.push(Tensor::f_arange(g, (Kind::Int64, dev))?.f_lt(n)?);
        }
        Ok(GtBatch {
            bboxes: Tensor::f_stack(&bs, 0)?,
            labels: Tensor::f_stack(&ls, 0)?,
            valid: Tensor::f_stack(&vs, 0)?,
        })
    }

    /// Checks the shapes and returns `(B, G)`.
    pub(crate) fn dims(&self) -> Result<(i64, i64)> {
        let s = self.bboxes.size();
        ensure!(
            s.len() == 3 && s[2] == 4,
            "ground truth boxes must be (B, G, 4), got {s:?}"
        );
        ensure!(
            self.labels.size() == s[..2] && self.valid.size() == s[..2],
            "ground truth labels {:?} and validity {:?} for boxes {s:?}",
            self.labels.size(),
            self.valid.size()
        );
        ensure!(
            self.bboxes.is_floating_point(),
            "ground truth boxes must be floating point, got {:?}",
            self.bboxes.kind()
        );
        Ok((s[0], s[1]))
    }
}

/// `bbox_overlaps` of MMDetection (`mmdet/structures/bbox/bbox_overlaps.py`), not aligned:
/// `(..., R, 4)` against `(..., C, 4)` gives `(..., R, C)`, with the union (or for `iof` the first
/// box's area) clamped at `eps` = 1e-6.
///
/// The same elementwise operations as MMDetection's (so the same bits), one coordinate at a
/// time: `(..., R, 1)` against `(..., 1, C)` planes, so that every pass runs along the last
/// dimension of the result rather than along pairs of coordinates; the wide side belongs last.
pub fn bbox_overlaps(b1: &Tensor, b2: &Tensor, iof: bool) -> Result<Tensor> {
    pairwise_overlaps(b1, b2, if iof { Mode::Iof } else { Mode::Iou })
}

/// [`bbox_overlaps`] in mode 'giou': the IoU minus the enclosing box's area outside the union
/// over the enclosing area (clamped at `eps` too).
pub(crate) fn bbox_gious(b1: &Tensor, b2: &Tensor) -> Result<Tensor> {
    pairwise_overlaps(b1, b2, Mode::Giou)
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Iou,
    Iof,
    Giou,
}

fn pairwise_overlaps(b1: &Tensor, b2: &Tensor, mode: Mode) -> Result<Tensor> {
    // Each box tensor as 4 contiguous coordinate planes.
    let planes = |b: &Tensor| -> Result<Tensor> { Ok(b.f_movedim(-1, 0)?.f_contiguous()?) };
    let (p1, p2) = (planes(b1)?, planes(b2)?);
    let area = |p: &Tensor| (p.get(2) - p.get(0)) * (p.get(3) - p.get(1));
    let (a1, a2) = (area(&p1).unsqueeze(-1), area(&p2).unsqueeze(-2));
    let c1 = |j: i64| p1.get(j).unsqueeze(-1); // (..., R, 1)
    let c2 = |j: i64| p2.get(j).unsqueeze(-2); // (..., 1, C)
                                               // The overlap's side (min of the highs minus max of the lows), or the enclosing box's.
    let side = |lo: i64, hi: i64, enclosing: bool| -> Result<Tensor> {
        let (h, l) = if enclosing {
            (c1(hi).f_maximum(&c2(hi))?, c1(lo).f_minimum(&c2(lo))?)
        } else {
            (c1(hi).f_minimum(&c2(hi))?, c1(lo).f_maximum(&c2(lo))?)
        };
        Ok((h - l).f_clamp_min(0.0)?)
    };
    let overlap = side(0, 2, false)? * side(1, 3, false)?;
    let union = if mode == Mode::Iof {
        a1
    } else {
        a1 + a2 - &overlap
    };
    let eps = Tensor::f_full([1], 1e-6, (union.kind(), union.device()))?;
    let union = union.f_maximum(&eps)?;
    let ious = overlap / &union;
    if mode != Mode::Giou {
        return Ok(ious);
    }
    let enclose = (side(0, 2, true)? * side(1, 3, true)?).f_maximum(&eps)?;
    Ok(ious - (&enclose - union) / enclose)
}

/// Box centres `(..., 2)` as MMDetection computes them, `(x1 + x2) / 2`.
pub(crate) fn centres(b: &Tensor) -> Tensor {
    Tensor::stack(
        &[
            (b.select(-1, 0) + b.select(-1, 2)) / 2.0,
            (b.select(-1, 1) + b.select(-1, 3)) / 2.0,
        ],
        -1,
    )
}

/// The assigners' shared config checks: `topk >= 1`, and only the default `iou_calculator`
/// (`BboxOverlaps2D`, plain IoU).
pub(crate) fn check_topk_and_iou(
    topk: i64,
    iou_calculator: Option<&serde_json::Value>,
    who: &str,
) -> Result<()> {
    ensure!(topk >= 1, "{who}: topk must be >= 1, got {topk}");
    if let Some(calc) = iou_calculator {
        ensure!(
            calc.get("type").and_then(serde_json::Value::as_str) == Some("BboxOverlaps2D")
                && calc.as_object().is_some_and(|o| o.len() == 1),
            "{who}: only the default iou_calculator (BboxOverlaps2D) is supported, got {calc}"
        );
    }
    Ok(())
}

/// The predictions the point assigners take: decoded boxes `(B, N, 4)` and class scores
/// `(B, N, C)`; returns `C`.
pub(crate) fn check_predictions(
    who: &str,
    decoded: &Tensor,
    scores: &Tensor,
    b: i64,
    n: i64,
) -> Result<i64> {
    ensure!(
        decoded.size() == [b, n, 4],
        "{who}: decoded boxes {:?}, need [{b}, {n}, 4]",
        decoded.size()
    );
    let ss = scores.size();
    ensure!(
        ss.len() == 3 && ss[..2] == [b, n] && ss[2] > 0 && scores.is_floating_point(),
        "{who}: scores {ss:?} {:?}, need floating [{b}, {n}, C]",
        scores.kind()
    );
    Ok(ss[2])
}

/// The ground-truth chunk size for `(B, N, chunk)` intermediates of at most `elements`.
/// The smallest of the four distances from points `(px, py)` to the sides of `boxes` `(B, w, 4)`
/// (positive strictly inside), the boxes' dimension of the points being `dim` (1 or 2): the
/// centre-inside test of ATSS, TaskAligned and DynamicSoftLabel assignment.
pub(crate) fn inside_gap(px: &Tensor, py: &Tensor, boxes: &Tensor, dim: i64) -> Result<Tensor> {
    let side = |j: i64| boxes.select(2, j).unsqueeze(dim);
    Ok((px - side(0))
        .f_minimum(&(py - side(1)))?
        .f_minimum(&(side(2) - px))?
        .f_minimum(&(side(3) - py))?)
}

pub(crate) fn gt_chunk(b: i64, n: i64, g: i64, elements: i64) -> i64 {
    (elements / (b * n).max(1)).clamp(1, g.max(1))
}

/// `(B, G, ...)` ground truths of image-major batch as per-gt labels gathered at `inds - 1`
/// where `inds > 0`, else -1.
fn gather_labels(gt_inds: &Tensor, labels: &Tensor) -> Result<Tensor> {
    if labels.size()[1] == 0 {
        return Ok(gt_inds.f_full_like(-1)?);
    }
    let idx = (gt_inds - 1).f_clamp_min(0)?;
    Ok(labels
        .f_gather(1, &idx, false)?
        .f_where_scalarother(&gt_inds.f_gt(0)?, -1)?)
}

/// What both assigners start from: the checked sizes and the batch's derived tensors.
pub(crate) struct Setup {
    pub b: i64,
    pub g: i64,
    pub n: i64,
    pub kind: Kind,
    pub dev: tch::Device,
    /// The ground truths in the priors' dtype.
    pub gt_boxes: Tensor,
    pub num_gts: Tensor,
    /// `(B, N)` bool: priors outside each image, where an inside mask was given.
    pub outside: Option<Tensor>,
}

/// Checks an assigner's inputs: priors `(N, 4)`, the padded ground truths, the inside mask.
pub(crate) fn setup(
    name: &str,
    priors: &Tensor,
    gts: &GtBatch,
    inside: Option<&Tensor>,
) -> Result<Setup> {
    let (b, g) = gts.dims()?;
    ensure!(
        priors.dim() == 2 && priors.size()[1] == 4,
        "{name}: priors must be (N, 4), got {:?}",
        priors.size()
    );
    let n = priors.size()[0];
    if let Some(m) = inside {
        ensure!(
            m.size() == [b, n],
            "{name}: inside is {:?}, need [{b}, {n}]",
            m.size()
        );
    }
    let (kind, dev) = (priors.kind(), priors.device());
    Ok(Setup {
        b,
        g,
        n,
        kind,
        dev,
        gt_boxes: gts.bboxes.f_to_kind(kind)?,
        num_gts: gts.valid.f_sum_dim_intlist(1, false, Kind::Int64)?,
        outside: match inside {
            Some(m) => Some(m.f_to_kind(Kind::Bool)?.f_logical_not()?),
            None => None,
        },
    })
}

impl Setup {
    /// The priors whose largest iof with an ignore box exceeds `thr`, `(B, N)` bool; `None` where
    /// MMDetection skips the step (`thr <= 0`, no ignore boxes, no priors). The iof is relative
    /// to the prior's area, or with `wrt_priors` false to the ignore box's.
    pub fn ignored(
        &self,
        priors: &Tensor,
        ignore: Option<&GtBatch>,
        thr: f64,
        wrt_priors: bool,
    ) -> Result<Option<Tensor>> {
        let Some(ign) = ignore else { return Ok(None) };
        let (_, ni) = ign.dims()?;
        if thr <= 0.0 || ni == 0 || self.n == 0 {
            return Ok(None);
        }
        let boxes = ign.bboxes.f_to_kind(self.kind)?;
        let invalid = ign.valid.f_logical_not()?;
        let worst = if wrt_priors {
            let iof = bbox_overlaps(&priors.unsqueeze(0), &boxes, true)?; // (B, N, I)
            iof.f_masked_fill(&invalid.f_unsqueeze(1)?, f64::NEG_INFINITY)?
                .f_amax([2], false)?
        } else {
            let iof = bbox_overlaps(&boxes, &priors.unsqueeze(0), true)?; // (B, I, N)
            iof.f_masked_fill(&invalid.f_unsqueeze(2)?, f64::NEG_INFINITY)?
                .f_amax([1], false)?
        };
        Ok(Some(worst.f_gt(thr)?))
    }

    /// MMDetection's end of an assignment: an image without ground truths is 0 everywhere with
    /// `max_overlaps` 0 (it returns before anything else), priors outside the image are -1, and
    /// the labels are the assigned ground truths'.
    pub fn finish(
        &self,
        gt_inds: Tensor,
        max_overlaps: Tensor,
        gt_labels: &Tensor,
    ) -> Result<AssignResult> {
        let has_gt = self.num_gts.f_gt(0)?.f_unsqueeze(1)?;
        let mut gt_inds = gt_inds.f_where_scalarother(&has_gt, 0)?;
        let max_overlaps = max_overlaps.f_where_scalarother(&has_gt, 0.0)?;
        if let Some(out) = &self.outside {
            gt_inds = gt_inds.f_masked_fill(out, -1)?;
        }
        let labels = gather_labels(&gt_inds, gt_labels)?;
        Ok(AssignResult {
            num_gts: self.num_gts.shallow_clone(),
            gt_inds,
            max_overlaps,
            labels,
        })
    }
}

/// Keeps, per prior, the better of the best so far and a chunk's best (`idx` relative to the
/// chunk starting at ground truth `g0`): strictly greater, so that on ties the earlier ground
/// truth keeps the prior, as `max` over all of them would.
pub(crate) fn keep_better(
    best: &mut Tensor,
    best_gt: &mut Tensor,
    vals: &Tensor,
    idx: &Tensor,
    g0: i64,
) -> Result<()> {
    let better = vals.f_gt_tensor(&*best)?;
    *best = vals.f_where_self(&better, &*best)?;
    *best_gt = (idx + g0).f_where_self(&better, &*best_gt)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// MMDetection's composition, pairs of coordinates at a time.
    fn by_pairs(b1: &Tensor, b2: &Tensor, iof: bool) -> Tensor {
        let area =
            |b: &Tensor| (b.select(-1, 2) - b.select(-1, 0)) * (b.select(-1, 3) - b.select(-1, 1));
        let (a1, a2) = (area(b1), area(b2));
        let lt = b1
            .narrow(-1, 0, 2)
            .unsqueeze(-2)
            .maximum(&b2.narrow(-1, 0, 2).unsqueeze(-3));
        let rb = b1
            .narrow(-1, 2, 2)
            .unsqueeze(-2)
            .minimum(&b2.narrow(-1, 2, 2).unsqueeze(-3));
        let wh = (rb - lt).clamp_min(0.0);
        let overlap = wh.select(-1, 0) * wh.select(-1, 1);
        let union = if iof {
            a1.unsqueeze(-1)
        } else {
            a1.unsqueeze(-1) + a2.unsqueeze(-2) - &overlap
        };
        overlap / union.maximum(&Tensor::full([1], 1e-6, (union.kind(), union.device())))
    }

    #[test]
    fn bbox_overlaps_by_planes_gives_the_pairs_composition_bit_for_bit() {
        tch::manual_seed(4);
        for kind in [Kind::Float, Kind::Double] {
            let boxes = |shape: &[i64]| {
                let lo = Tensor::rand(shape, (kind, Device::Cpu)) * 50.0;
                // Some empty and some inverted boxes too.
                let wh = Tensor::rand(shape, (kind, Device::Cpu)) * 30.0 - 3.0;
                Tensor::cat(&[&lo, &(&lo + wh)], -1)
            };
            let (b1, b2) = (boxes(&[3, 40, 2]), boxes(&[3, 7, 2]));
            for iof in [false, true] {
                for (x, y) in [(&b1, &b2), (&b2, &b1)] {
                    let (got, want) = (bbox_overlaps(x, y, iof).unwrap(), by_pairs(x, y, iof));
                    assert_eq!(got.size(), want.size());
                    let bits = |t: &Tensor| match kind {
                        Kind::Float => t.view_dtype(Kind::Int),
                        _ => t.view_dtype(Kind::Int64),
                    };
                    assert!(bits(&got).equal(&bits(&want)), "{kind:?} iof {iof}");
                }
                // Broadcast batch dimensions: (40, 4) against (3, 7, 4).
                let got = bbox_overlaps(&b1.get(0).unsqueeze(0), &b2, iof).unwrap();
                let want = by_pairs(&b1.get(0).unsqueeze(0), &b2, iof);
                assert!(got.equal(&want));
            }
        }
    }
}
