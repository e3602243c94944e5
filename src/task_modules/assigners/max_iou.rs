//! MMDetection's `MaxIoUAssigner` (`max_iou_assigner.py`), batched over images.

use anyhow::{bail, ensure, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use super::atss::check_iou_calculator;
use super::{bbox_overlaps, gt_chunk, keep_better, setup, AssignResult, GtBatch, CHUNK_ELEMENTS};
use crate::registry::parse_config;

/// `neg_iou_thr` as MMDetection reads it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NegIouThr {
    /// A float: negatives are `0 <= max IoU < thr`.
    Below(f64),
    /// A pair `(lo, hi)` (a Python tuple; a JSON list of two): negatives are `lo <= max IoU < hi`.
    Range(f64, f64),
    /// An integer (e.g. `0`): MMDetection's `isinstance(float)` and `isinstance(tuple)` checks
    /// both fail, and no prior is ever negative. Reproduced, as MMDetection silently does.
    Never,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    pos_iou_thr: f64,
    neg_iou_thr: Value,
    #[serde(default)]
    min_pos_iou: f64,
    #[serde(default = "yes")]
    gt_max_assign_all: bool,
    #[serde(default = "minus_one")]
    ignore_iof_thr: f64,
    #[serde(default = "yes")]
    ignore_wrt_candidates: bool,
    #[serde(default = "yes")]
    match_low_quality: bool,
    #[serde(default = "minus_one")]
    gpu_assign_thr: f64,
    #[serde(default)]
    iou_calculator: Option<Value>,
    #[serde(default)]
    perm_repeat_gt_cfg: Option<Value>,
}

fn yes() -> bool {
    true
}
fn minus_one() -> f64 {
    -1.0
}

/// MMDetection's `MaxIoUAssigner`: each prior takes the ground truth of its largest IoU when
/// that is at least `pos_iou_thr`, is negative below `neg_iou_thr`, and (with
/// `match_low_quality`) each ground truth then claims its best priors (all of those at its
/// maximum with `gt_max_assign_all`, else the first) where that maximum is at least
/// `min_pos_iou`, later ground truths overwriting earlier ones.
///
/// `max_overlaps` is the plain largest IoU; ignored priors (`iof > ignore_iof_thr`) have their
/// IoUs set to -1 first. An image without ground truths gives 0 everywhere.
#[derive(Clone, Debug)]
pub struct MaxIoUAssigner {
    /// IoU at or above which a prior is positive.
    pub pos_iou_thr: f64,
    /// Which priors are negative.
    pub neg_iou_thr: NegIouThr,
    /// The least IoU of a low-quality match.
    pub min_pos_iou: f64,
    /// Low-quality matches take every prior at a ground truth's maximum, not only the first.
    pub gt_max_assign_all: bool,
    /// Priors whose iof with an ignore box exceeds this are ignored (when > 0).
    pub ignore_iof_thr: f64,
    /// iof relative to the prior's area (true) or to the ignore box's (false).
    pub ignore_wrt_candidates: bool,
    /// Let each ground truth claim its best priors.
    pub match_low_quality: bool,
    /// The largest `(B, ground truths, N)` intermediate, in elements (results do not depend on it).
    pub chunk_elements: i64,
}

impl MaxIoUAssigner {
    /// Builds it from its config dict. `gpu_assign_thr` is accepted and has no effect (the
    /// assignment is chunked instead); `perm_repeat_gt_cfg` is not supported.
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: Config = parse_config(config)?;
        check_iou_calculator(c.iou_calculator.as_ref())?;
        ensure!(
            c.perm_repeat_gt_cfg.as_ref().is_none_or(Value::is_null),
            "MaxIoUAssigner: perm_repeat_gt_cfg is not supported"
        );
        let _ = c.gpu_assign_thr;
        let neg_iou_thr = match &c.neg_iou_thr {
            Value::Number(v) if v.is_f64() => NegIouThr::Below(v.as_f64().unwrap_or(0.0)),
            Value::Number(_) => NegIouThr::Never,
            Value::Array(a) if a.len() == 2 && a.iter().all(Value::is_number) => {
                NegIouThr::Range(a[0].as_f64().unwrap_or(0.0), a[1].as_f64().unwrap_or(0.0))
            }
            other => bail!("MaxIoUAssigner: neg_iou_thr must be a number or a pair, got {other}"),
        };
        Ok(Self {
            pos_iou_thr: c.pos_iou_thr,
            neg_iou_thr,
            min_pos_iou: c.min_pos_iou,
            gt_max_assign_all: c.gt_max_assign_all,
            ignore_iof_thr: c.ignore_iof_thr,
            ignore_wrt_candidates: c.ignore_wrt_candidates,
            match_low_quality: c.match_low_quality,
            chunk_elements: CHUNK_ELEMENTS,
        })
    }

    /// Assigns the priors `(N, 4)` to the padded ground truths of `B` images. `inside`,
    /// `(B, N)` bool, restricts each image to some priors (as MMDetection's heads assign only
    /// the anchors inside the image); the others come out ignored (-1).
    pub fn assign(
        &self,
        priors: &Tensor,
        gts: &GtBatch,
        ignore: Option<&GtBatch>,
        inside: Option<&Tensor>,
    ) -> Result<AssignResult> {
        let st = setup("MaxIoUAssigner", priors, gts, inside)?;
        let (b, g, n, kind, dev) = (st.b, st.g, st.n, st.kind, st.dev);
        let ignored = st.ignored(
            priors,
            ignore,
            self.ignore_iof_thr,
            self.ignore_wrt_candidates,
        )?;
        let outside = st.outside.as_ref();
        let gt_boxes = &st.gt_boxes;
        let mut best = Tensor::f_full([b, n], f64::NEG_INFINITY, (kind, dev))?;
        let mut best_gt = Tensor::f_zeros([b, n], (Kind::Int64, dev))?;
        let mut low_quality = Tensor::f_zeros([b, n], (Kind::Int64, dev))?;
        if g > 0 && n > 0 {
            let chunk = gt_chunk(b, n, g, self.chunk_elements);
            let prior_idx = Tensor::f_arange(n, (Kind::Int64, dev))?.f_view([1, 1, n])?;
            let mut g0 = 0;
            while g0 < g {
                let w = chunk.min(g - g0);
                let valid = gts.valid.narrow(1, g0, w);
                let mut overlaps =
                    bbox_overlaps(&gt_boxes.narrow(1, g0, w), &priors.unsqueeze(0), false)?; // (B, w, N)
                if let Some(ign) = &ignored {
                    overlaps = overlaps.f_masked_fill(&ign.unsqueeze(1), -1.0)?;
                }
                // Priors outside the image are not there for MMDetection's assigner: no ground
                // truth's best prior is one of them.
                if let Some(out) = outside {
                    overlaps = overlaps.f_masked_fill(&out.unsqueeze(1), f64::NEG_INFINITY)?;
                }
                // Padding ground truths never win a prior.
                let for_priors = overlaps
                    .f_masked_fill(&valid.f_logical_not()?.f_unsqueeze(2)?, f64::NEG_INFINITY)?;
                let (vals, idx) = for_priors.f_max_dim(1, false)?;
                keep_better(&mut best, &mut best_gt, &vals, &idx, g0)?;
                if self.match_low_quality {
                    let (gt_max, gt_arg) = overlaps.f_max_dim(2, true)?; // (B, w, 1)
                    let able = gt_max
                        .f_ge(self.min_pos_iou)?
                        .f_logical_and(&valid.f_unsqueeze(2)?)?;
                    let claims = if self.gt_max_assign_all {
                        overlaps.f_eq_tensor(&gt_max)?
                    } else {
                        prior_idx.f_eq_tensor(&gt_arg)?
                    };
                    let number = Tensor::f_arange_start(g0 + 1, g0 + w + 1, (Kind::Int64, dev))?
                        .f_view([1, w, 1])?;
                    // The last ground truth to claim a prior keeps it, as MMDetection's loop leaves it.
                    let last = number
                        .f_where_scalarother(&claims.f_logical_and(&able)?, 0)?
                        .f_amax([1], false)?;
                    low_quality = last.f_where_self(&last.f_gt(0)?, &low_quality)?;
                }
                g0 += w;
            }
        }
        let mut gt_inds = Tensor::f_full([b, n], -1, (Kind::Int64, dev))?;
        let negative = match self.neg_iou_thr {
            NegIouThr::Below(t) => Some(best.f_ge(0.0)?.f_logical_and(&best.f_lt(t)?)?),
            NegIouThr::Range(lo, hi) => Some(best.f_ge(lo)?.f_logical_and(&best.f_lt(hi)?)?),
            NegIouThr::Never => None,
        };
        if let Some(neg) = negative {
            gt_inds = gt_inds.f_masked_fill(&neg, 0)?;
        }
        gt_inds = (&best_gt + 1).f_where_self(&best.f_ge(self.pos_iou_thr)?, &gt_inds)?;
        if self.match_low_quality {
            gt_inds = low_quality.f_where_self(&low_quality.f_gt(0)?, &gt_inds)?;
        }
        st.finish(gt_inds, best, &gts.labels)
    }
}
