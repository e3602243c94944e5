//! MMDetection's `ATSSAssigner` (`atss_assigner.py`), batched over images.

use anyhow::{bail, ensure, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use super::{
    bbox_overlaps, centres, gt_chunk, inside_gap, keep_better, setup, AssignResult, GtBatch,
    CHUNK_ELEMENTS,
};
use crate::registry::parse_config;

/// MMDetection's `INF` of the ATSS assigner: the distance of an ignored prior and the
/// `max_overlaps` (negated) of every prior that is not positive.
const INF: f64 = 100_000_000.0;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    topk: i64,
    #[serde(default)]
    alpha: Option<f64>,
    #[serde(default)]
    iou_calculator: Option<Value>,
    #[serde(default = "minus_one")]
    ignore_iof_thr: f64,
}

fn minus_one() -> f64 {
    -1.0
}

/// MMDetection's `ATSSAssigner`: per ground truth, the `topk` priors of each level nearest to
/// its centre are candidates; those whose IoU is at least the candidates' mean + unbiased std,
/// and whose centre lies inside the box by more than 0.01, are positive; a prior claimed by
/// several ground truths goes to the highest IoU (the first on ties).
///
/// MMDetection's details are kept: `max_overlaps` is -1e8 for every prior that is not positive,
/// `labels` -1 there; a single candidate has a NaN std, so nothing is positive; priors inside an
/// ignore box (`iof > ignore_iof_thr`) are -1 and as far as 1e8, yet may still become positive;
/// an image without ground truths gives 0 everywhere.
#[derive(Clone, Debug)]
pub struct ATSSAssigner {
    /// Candidates per level and ground truth.
    pub topk: i64,
    /// Priors whose largest iof with an ignore box exceeds this are ignored (when > 0).
    pub ignore_iof_thr: f64,
    /// The largest `(B, N, ground truths)` intermediate, in elements (results do not depend on it).
    pub chunk_elements: i64,
}

impl ATSSAssigner {
    /// Builds it from its config dict (`topk`, `ignore_iof_thr`; the cost-based form with
    /// `alpha` is not supported).
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: Config = parse_config(config)?;
        ensure!(
            c.alpha.is_none(),
            "ATSSAssigner: the cost-based form (alpha) is not supported"
        );
        check_iou_calculator(c.iou_calculator.as_ref())?;
        ensure!(c.topk > 0, "ATSSAssigner: topk must be > 0, got {}", c.topk);
        Ok(Self {
            topk: c.topk,
            ignore_iof_thr: c.ignore_iof_thr,
            chunk_elements: CHUNK_ELEMENTS,
        })
    }

    /// Assigns the priors `(N, 4)` (levels in order, `num_level_priors` each) to the padded
    /// ground truths of `B` images.
    ///
    /// `inside`, `(B, N)` bool, restricts each image to some priors, as MMDetection's heads run
    /// the assigner on the anchors inside the image only: the others are never candidates (a
    /// level's `topk` counts the inside ones) and come out ignored (-1).
    pub fn assign(
        &self,
        priors: &Tensor,
        num_level_priors: &[i64],
        gts: &GtBatch,
        ignore: Option<&GtBatch>,
        inside: Option<&Tensor>,
    ) -> Result<AssignResult> {
        let st = setup("ATSSAssigner", priors, gts, inside)?;
        let (b, g, n, kind, dev) = (st.b, st.g, st.n, st.kind, st.dev);
        ensure!(
            num_level_priors.iter().all(|&l| l >= 0) && num_level_priors.iter().sum::<i64>() == n,
            "ATSSAssigner: num_level_priors {num_level_priors:?} does not add up to {n} priors"
        );
        let ignored = st.ignored(priors, ignore, self.ignore_iof_thr, true)?;
        let base = match &ignored {
            Some(hit) => Tensor::f_zeros([b, n], (Kind::Int64, dev))?.f_masked_fill(hit, -1)?,
            None => Tensor::f_zeros([b, n], (Kind::Int64, dev))?,
        };
        let mut best = Tensor::f_full([b, n], -INF, (kind, dev))?;
        let mut best_gt = Tensor::f_zeros([b, n], (Kind::Int64, dev))?;
        if g > 0 && n > 0 {
            let pc = centres(priors);
            let gc = centres(&st.gt_boxes);
            let chunk = gt_chunk(b, n, g, self.chunk_elements);
            let mut g0 = 0;
            while g0 < g {
                let w = chunk.min(g - g0);
                let part = Chunk {
                    g0,
                    w,
                    priors,
                    pc: &pc,
                    gc: &gc,
                    gt_boxes: &st.gt_boxes,
                    gts,
                    ignored: ignored.as_ref(),
                    outside: st.outside.as_ref(),
                };
                let (vals, idx) = self.chunk(&part, num_level_priors)?;
                keep_better(&mut best, &mut best_gt, &vals, &idx, g0)?;
                g0 += w;
            }
        }
        // Not positive: MMDetection's -INF stays as max_overlaps.
        let positive = best.f_ne(-INF)?;
        let gt_inds = (best_gt + 1).f_where_self(&positive, &base)?;
        st.finish(gt_inds, best, &gts.labels)
    }

    /// One chunk of ground truths: per prior, the best positive IoU among them (-INF if none)
    /// and which (chunk-relative).
    fn chunk(&self, c: &Chunk<'_>, num_level_priors: &[i64]) -> Result<(Tensor, Tensor)> {
        let kind = c.priors.kind();
        let boxes = c.gt_boxes.narrow(1, c.g0, c.w);
        let gcent = c.gc.narrow(1, c.g0, c.w);
        let valid = c.gts.valid.narrow(1, c.g0, c.w);
        let overlaps = bbox_overlaps(&c.priors.unsqueeze(0), &boxes, false)?; // (B, N, w)
        let diff = c.pc.unsqueeze(0).unsqueeze(2) - gcent.unsqueeze(1); // (B, N, w, 2)
        let mut dist = diff
            .f_pow_tensor_scalar(2)?
            .f_sum_dim_intlist(-1, false, kind)?
            .f_sqrt()?;
        if let Some(ign) = c.ignored {
            dist = dist.f_masked_fill(&ign.unsqueeze(2), INF)?;
        }
        if let Some(out) = c.outside {
            dist = dist.f_masked_fill(&out.unsqueeze(2), f64::INFINITY)?;
        }
        let mut cands = Vec::new();
        let mut start = 0;
        for &len in num_level_priors {
            if len > 0 {
                let k = self.topk.min(len);
                let (_, idx) = dist.narrow(1, start, len).f_topk(k, 1, false, true)?;
                cands.push(idx + start);
            }
            start += len;
        }
        let cand = Tensor::f_cat(&cands, 1)?; // (B, K, w)
        let cand_iou = overlaps.f_gather(1, &cand, false)?;
        let (mean, std, usable) = match c.outside {
            // The same reductions as MMDetection's, so that the threshold rounds as there.
            None => (
                cand_iou.f_mean_dim([1i64].as_slice(), false, kind)?,
                cand_iou.f_std_dim([1i64].as_slice(), true, false)?,
                None,
            ),
            Some(out) => {
                let ok = out
                    .f_logical_not()?
                    .f_gather(1, &cand.f_view([c.gts.valid.size()[0], -1])?, false)?
                    .f_view_as(&cand)?;
                let okf = ok.f_to_kind(kind)?;
                let count = okf.f_sum_dim_intlist(1, false, kind)?;
                let mean = (&cand_iou * &okf).f_sum_dim_intlist(1, false, kind)? / &count;
                let dev2 = (&cand_iou - mean.unsqueeze(1)).f_square()? * &okf;
                let std = (dev2.f_sum_dim_intlist(1, false, kind)? / (count - 1.0)).f_sqrt()?;
                (mean, std, Some(ok))
            }
        };
        let thr = (mean + std).f_unsqueeze(1)?;
        let mut is_pos = cand_iou.f_ge_tensor(&thr)?;
        // The candidate's centre must lie inside the box by more than 0.01 on every side.
        let flat = cand.f_flatten(0, -1)?;
        let px =
            c.pc.select(1, 0)
                .f_index_select(0, &flat)?
                .f_view_as(&cand)?;
        let py =
            c.pc.select(1, 1)
                .f_index_select(0, &flat)?
                .f_view_as(&cand)?;
        is_pos = is_pos.f_logical_and(&inside_gap(&px, &py, &boxes, 1)?.f_gt(0.01)?)?;
        is_pos = is_pos.f_logical_and(&valid.unsqueeze(1))?;
        if let Some(ok) = usable {
            is_pos = is_pos.f_logical_and(&ok)?;
        }
        let neg = Tensor::f_full_like(&cand_iou, -INF)?;
        let scattered = Tensor::f_full_like(&overlaps, -INF)?.f_scatter(
            1,
            &cand,
            &cand_iou.f_where_self(&is_pos, &neg)?,
        )?;
        Ok(scattered.f_max_dim(2, false)?)
    }
}

struct Chunk<'a> {
    g0: i64,
    w: i64,
    priors: &'a Tensor,
    pc: &'a Tensor,
    gc: &'a Tensor,
    gt_boxes: &'a Tensor,
    gts: &'a GtBatch,
    ignored: Option<&'a Tensor>,
    outside: Option<&'a Tensor>,
}

/// Only MMDetection's default IoU calculator, `BboxOverlaps2D` without fp16, is supported.
pub(super) fn check_iou_calculator(cfg: Option<&Value>) -> Result<()> {
    let Some(cfg) = cfg else { return Ok(()) };
    let ty = cfg.get("type").and_then(Value::as_str);
    let scale_one = cfg.get("scale").is_none_or(|s| s.as_f64() == Some(1.0));
    let no_dtype = cfg.get("dtype").is_none_or(Value::is_null);
    let known = cfg.as_object().is_some_and(|o| {
        o.keys()
            .all(|k| matches!(k.as_str(), "type" | "scale" | "dtype"))
    });
    if ty == Some("BboxOverlaps2D") && known && scale_one && no_dtype {
        return Ok(());
    }
    bail!("iou_calculator: only {{\"type\": \"BboxOverlaps2D\"}} is supported, got {cfg}")
}
