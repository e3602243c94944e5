//! MMDetection's box coders (`mmdet/models/task_modules/coders/`): `DeltaXYWHBBoxCoder`, boxes
//! as deltas of centre and log size relative to a prior, normalised by `target_means` and
//! `target_stds`; and `DistancePointBBoxCoder`, boxes as distances from a point to their sides
//! (with `bbox2distance` and `distance2bbox` of `mmdet/structures/bbox/transforms.py`).
//!
//! ```
//! use tch::Tensor;
//! use tch_detloss::task_modules::DeltaXYWHBBoxCoder;
//!
//! let coder = DeltaXYWHBBoxCoder::from_config(&serde_json::json!({
//!     "type": "DeltaXYWHBBoxCoder", "target_means": [0, 0, 0, 0], "target_stds": [0.1, 0.1, 0.2, 0.2]}))?;
//! let priors = Tensor::from_slice(&[0.0f32, 0.0, 10.0, 10.0]).view([1, 4]);
//! let gts = Tensor::from_slice(&[1.0f32, 2.0, 11.0, 12.0]).view([1, 4]);
//! let deltas = coder.encode(&priors, &gts)?;
//! let back = coder.decode(&priors, &deltas, None)?;
//! assert!(back.allclose(&gts, 1e-5, 1e-5, false));
//! # anyhow::Ok(())
//! ```

use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use super::device_values;
use crate::registry::parse_config;

/// MMDetection's default `wh_ratio_clip`, 16 / 1000.
pub const WH_RATIO_CLIP: f64 = 16.0 / 1000.0;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "zeros")]
    target_means: [f64; 4],
    #[serde(default = "ones")]
    target_stds: [f64; 4],
    #[serde(default = "yes")]
    clip_border: bool,
    #[serde(default)]
    add_ctr_clamp: bool,
    #[serde(default = "ctr_clamp")]
    ctr_clamp: f64,
    #[serde(default)]
    use_box_type: bool,
}

fn zeros() -> [f64; 4] {
    [0.0; 4]
}
fn ones() -> [f64; 4] {
    [1.0; 4]
}
fn yes() -> bool {
    true
}
fn ctr_clamp() -> f64 {
    32.0
}

/// Where decoded boxes are clipped: nowhere, one image `(h, w)`, or one per image of a `(B, N, 4)`
/// batch.
#[derive(Clone, Copy, Debug)]
pub enum MaxShape<'a> {
    /// One image size `(h, w)` for all boxes.
    Image(i64, i64),
    /// One `(h, w)` per image of a 3-D batch.
    PerImage(&'a [(i64, i64)]),
}

/// MMDetection's `DeltaXYWHBBoxCoder`.
#[derive(Clone, Debug)]
pub struct DeltaXYWHBBoxCoder {
    /// `target_means`.
    pub means: [f64; 4],
    /// `target_stds`.
    pub stds: [f64; 4],
    /// Clip decoded boxes to `max_shape` when one is given.
    pub clip_border: bool,
    /// Clamp the centre shift to ±`ctr_clamp` pixels (and the log size from above only).
    pub add_ctr_clamp: bool,
    /// The centre clamp, in pixels.
    pub ctr_clamp: f64,
}

impl DeltaXYWHBBoxCoder {
    /// Builds it from its config dict.
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: Config = parse_config(config)?;
        ensure!(
            !c.use_box_type,
            "DeltaXYWHBBoxCoder: use_box_type is not supported (boxes are plain tensors)"
        );
        ensure!(
            c.target_stds.iter().all(|&s| s != 0.0),
            "DeltaXYWHBBoxCoder: target_stds must be non-zero"
        );
        Ok(Self {
            means: c.target_means,
            stds: c.target_stds,
            clip_border: c.clip_border,
            add_ctr_clamp: c.add_ctr_clamp,
            ctr_clamp: c.ctr_clamp,
        })
    }

    /// `bbox2delta`: the deltas that take `bboxes` to `gt_bboxes`, `(..., 4)` float32 whatever
    /// the inputs' dtype (MMDetection calls `.float()` on both).
    pub fn encode(&self, bboxes: &Tensor, gt_bboxes: &Tensor) -> Result<Tensor> {
        ensure!(
            bboxes.size() == gt_bboxes.size() && bboxes.size().last() == Some(&4),
            "encode: boxes {:?} and gt boxes {:?} must have one shape (..., 4)",
            bboxes.size(),
            gt_bboxes.size()
        );
        let p = bboxes.f_to_kind(Kind::Float)?;
        let g = gt_bboxes.f_to_kind(Kind::Float)?;
        let c = |t: &Tensor, j: i64| t.select(-1, j);
        let (px, py) = ((c(&p, 0) + c(&p, 2)) * 0.5, (c(&p, 1) + c(&p, 3)) * 0.5);
        let (pw, ph) = (c(&p, 2) - c(&p, 0), c(&p, 3) - c(&p, 1));
        let (gx, gy) = ((c(&g, 0) + c(&g, 2)) * 0.5, (c(&g, 1) + c(&g, 3)) * 0.5);
        let (gw, gh) = (c(&g, 2) - c(&g, 0), c(&g, 3) - c(&g, 1));
        let deltas = Tensor::f_stack(
            &[
                (gx - px) / &pw,
                (gy - py) / &ph,
                (gw / pw).log(),
                (gh / ph).log(),
            ],
            -1,
        )?;
        let dev = deltas.device();
        let means = device_values(&self.means, Kind::Float, dev)?;
        let stds = device_values(&self.stds, Kind::Float, dev)?;
        Ok((deltas - means) / stds)
    }

    /// `delta2bbox`: boxes from `deltas` relative to `bboxes`, in the deltas' dtype.
    ///
    /// `bboxes` `(N, 4)` with `deltas` `(N, 4 k)` (k class slots, each decoded from the same
    /// prior), or `bboxes` `(B, N, 4)` with `deltas` `(B, N, 4 k)` (MMDetection's batch path).
    /// dw and dh are clamped to ±|log(`wh_ratio_clip`)|; with `add_ctr_clamp` the centre shift is
    /// clamped to ±`ctr_clamp` and dw, dh from above only, as MMDetection does. Clipped to
    /// `[0, w] × [0, h]` when `clip_border` and a `max_shape` is given.
    pub fn decode(
        &self,
        bboxes: &Tensor,
        deltas: &Tensor,
        max_shape: Option<MaxShape<'_>>,
    ) -> Result<Tensor> {
        self.decode_with(bboxes, deltas, max_shape, WH_RATIO_CLIP)
    }

    /// [`decode`](Self::decode) with another `wh_ratio_clip`.
    pub fn decode_with(
        &self,
        bboxes: &Tensor,
        deltas: &Tensor,
        max_shape: Option<MaxShape<'_>>,
        wh_ratio_clip: f64,
    ) -> Result<Tensor> {
        let (bs, ds) = (bboxes.size(), deltas.size());
        let shapes_ok = match (bs.len(), ds.len()) {
            (2, 2) => bs[0] == ds[0] && bs[1] == 4 && ds[1] % 4 == 0,
            (3, 3) => bs[..2] == ds[..2] && bs[2] == 4 && ds[2] % 4 == 0,
            _ => false,
        };
        ensure!(
            shapes_ok,
            "decode: boxes {bs:?} and deltas {ds:?}: need (N, 4) with (N, 4k), or (B, N, 4) with (B, N, 4k)"
        );
        ensure!(
            deltas.is_floating_point() && bboxes.is_floating_point(),
            "decode: boxes and deltas must be floating point, got {:?} and {:?}",
            bboxes.kind(),
            deltas.kind()
        );
        let k = ds[ds.len() - 1] / 4;
        if ds[0] == 0 {
            // delta2bbox returns the deltas tensor itself for N = 0.
            return Ok(deltas.shallow_clone());
        }
        let kind = deltas.kind();
        let dev = deltas.device();
        let means = device_values(&self.means, kind, dev)?;
        let stds = device_values(&self.stds, kind, dev)?;
        // One row of 4 per (box, class slot); the prior repeats over the slots.
        let d = deltas.f_reshape([-1, 4])? * stds + means;
        let rois = bboxes.f_unsqueeze(-2)?.f_expand(
            bs[..bs.len() - 1]
                .iter()
                .copied()
                .chain([k, 4])
                .collect::<Vec<_>>(),
            false,
        )?;
        let rois = rois.f_reshape([-1, 4])?;
        let (dxy, dwh) = (d.narrow(1, 0, 2), d.narrow(1, 2, 2));
        let (lo, hi) = (rois.narrow(1, 0, 2), rois.narrow(1, 2, 2));
        let pxy = (&lo + &hi) * 0.5;
        let pwh = hi - lo;
        let max_ratio = wh_ratio_clip.ln().abs();
        let mut dxy_wh = &pwh * dxy;
        let dwh = if self.add_ctr_clamp {
            dxy_wh = dxy_wh.clamp(-self.ctr_clamp, self.ctr_clamp);
            dwh.clamp_max(max_ratio)
        } else {
            dwh.clamp(-max_ratio, max_ratio)
        };
        let gxy = pxy + dxy_wh;
        let gwh = pwh * dwh.exp();
        let half = &gwh * 0.5;
        let mut boxes = Tensor::f_cat(&[&gxy - &half, &gxy + &half], -1)?;
        if let (true, Some(shape)) = (self.clip_border, max_shape) {
            boxes = clip(boxes, shape, &bs, k)?;
        }
        Ok(boxes.f_reshape(ds.as_slice())?)
    }
}

/// Clamps the x of (rows of 4) boxes to [0, w] and y to [0, h].
fn clip(boxes: Tensor, shape: MaxShape<'_>, bs: &[i64], k: i64) -> Result<Tensor> {
    let dev = boxes.device();
    let hw: Vec<(i64, i64)> = match shape {
        MaxShape::Image(h, w) => vec![(h, w)],
        MaxShape::PerImage(s) => {
            ensure!(
                bs.len() == 3 && s.len() as i64 == bs[0],
                "decode: {} max shapes for boxes {bs:?}",
                s.len()
            );
            s.to_vec()
        }
    };
    let hi: Vec<f64> = hw
        .iter()
        .flat_map(|&(h, w)| [w as f64, h as f64, w as f64, h as f64])
        .collect();
    let hi = device_values(&hi, boxes.kind(), dev)?.view([-1, 1, 4]);
    let rows_per_image = if hw.len() == 1 {
        boxes.size()[0]
    } else {
        bs[1] * k
    };
    let b = boxes
        .f_view([hw.len() as i64, rows_per_image, 4])
        .context("decode: clip")?;
    Ok(b.f_clamp_min(0.0)?.f_minimum(&hi)?.f_view([-1, 4])?)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DistanceConfig {
    #[serde(default = "yes")]
    clip_border: bool,
    #[serde(default)]
    use_box_type: bool,
}

/// MMDetection's `DistancePointBBoxCoder` (`coders/distance_point_bbox_coder.py`): a box as the
/// distances `(left, top, right, bottom)` from a point to its sides, as FCOS, GFL, RTMDet and
/// TOOD regress it.
///
/// ```
/// use tch::Tensor;
/// use tch_detloss::task_modules::DistancePointBBoxCoder;
///
/// let coder = DistancePointBBoxCoder::from_config(&serde_json::json!({"type": "DistancePointBBoxCoder"}))?;
/// let points = Tensor::from_slice(&[5.0f32, 6.0]).view([1, 2]);
/// let gts = Tensor::from_slice(&[1.0f32, 2.0, 11.0, 12.0]).view([1, 4]);
/// let d = coder.encode(&points, &gts, None, 0.1)?;
/// assert_eq!(Vec::<f32>::try_from(d.view([-1]))?, [4.0, 4.0, 6.0, 6.0]);
/// assert!(coder.decode(&points, &d, None)?.equal(&gts));
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug)]
pub struct DistancePointBBoxCoder {
    /// Clip decoded boxes to `max_shape` when one is given.
    pub clip_border: bool,
}

impl DistancePointBBoxCoder {
    /// Builds it from its config dict (`clip_border`, default true).
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: DistanceConfig = parse_config(config)?;
        ensure!(
            !c.use_box_type,
            "DistancePointBBoxCoder: use_box_type is not supported (boxes are plain tensors)"
        );
        Ok(Self {
            clip_border: c.clip_border,
        })
    }

    /// [`bbox2distance`]: `points` `(..., 2)` and `gt_bboxes` `(..., 4)` with the same leading
    /// shape.
    pub fn encode(
        &self,
        points: &Tensor,
        gt_bboxes: &Tensor,
        max_dis: Option<f64>,
        eps: f64,
    ) -> Result<Tensor> {
        bbox2distance(points, gt_bboxes, max_dis, eps)
    }

    /// [`distance2bbox`], clipped to `max_shape` only when `clip_border`.
    pub fn decode(
        &self,
        points: &Tensor,
        distances: &Tensor,
        max_shape: Option<MaxShape<'_>>,
    ) -> Result<Tensor> {
        distance2bbox(points, distances, max_shape.filter(|_| self.clip_border))
    }
}

/// The leading shapes of points `(..., 2)` and boxes or distances `(..., 4)` agree.
fn check_points(what: &str, points: &Tensor, other: &Tensor, name: &str) -> Result<()> {
    let (p, o) = (points.size(), other.size());
    ensure!(
        !p.is_empty()
            && p.len() == o.len()
            && p[p.len() - 1] == 2
            && o[o.len() - 1] == 4
            && p[..p.len() - 1] == o[..o.len() - 1],
        "{what}: points {p:?} and {name} {o:?}: need (N, 2) with (N, 4), or (B, N, 2) with (B, N, 4)"
    );
    ensure!(
        points.is_floating_point() && other.is_floating_point(),
        "{what}: points and {name} must be floating point, got {:?} and {:?}",
        points.kind(),
        other.kind()
    );
    Ok(())
}

/// MMDetection's `bbox2distance`: the distances `(left, top, right, bottom)` from `points` to
/// the sides of `bboxes` (`x1, y1, x2, y2`), each clamped to `[0, max_dis - eps]` when `max_dis`
/// is given (GFL's DFL targets: `max_dis = reg_max`, `eps = 0.01`).
pub fn bbox2distance(
    points: &Tensor,
    bboxes: &Tensor,
    max_dis: Option<f64>,
    eps: f64,
) -> Result<Tensor> {
    check_points("bbox2distance", points, bboxes, "boxes")?;
    let (px, py) = (points.select(-1, 0), points.select(-1, 1));
    let mut sides = [
        &px - bboxes.select(-1, 0),
        &py - bboxes.select(-1, 1),
        bboxes.select(-1, 2) - &px,
        bboxes.select(-1, 3) - &py,
    ];
    if let Some(m) = max_dis {
        for s in &mut sides {
            *s = s.f_clamp(0.0, m - eps)?;
        }
    }
    Ok(Tensor::f_stack(&sides, -1)?)
}

/// MMDetection's `distance2bbox`: the boxes `(x1, y1, x2, y2)` at `distances` `(left, top,
/// right, bottom)` from `points`, clipped to `[0, w] × [0, h]` of `max_shape` when one is given
/// (one image, or one per image of a `(B, N, 4)` batch).
pub fn distance2bbox(
    points: &Tensor,
    distances: &Tensor,
    max_shape: Option<MaxShape<'_>>,
) -> Result<Tensor> {
    check_points("distance2bbox", points, distances, "distances")?;
    let (px, py) = (points.select(-1, 0), points.select(-1, 1));
    let boxes = Tensor::f_stack(
        &[
            &px - distances.select(-1, 0),
            &py - distances.select(-1, 1),
            &px + distances.select(-1, 2),
            &py + distances.select(-1, 3),
        ],
        -1,
    )?;
    let Some(shape) = max_shape else {
        return Ok(boxes);
    };
    let s = boxes.size();
    if s[0] == 0 {
        return Ok(boxes);
    }
    let out = clip(boxes.f_reshape([-1, 4])?, shape, &s, 1)?;
    Ok(out.f_reshape(s.as_slice())?)
}
