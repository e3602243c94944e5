//! MMDetection's `FCOSHead` targets (`mmdet/models/dense_heads/fcos_head.py`: `get_targets`,
//! `_get_targets_single`, `centerness_target` and the target side of `loss_by_feat`), batched
//! over images and free of host reads.
//!
//! MMDetection loops over the images and builds a `(points, gts)` matrix per image; here the
//! whole batch is one `(B, N, G)` computation over padded ground truths ([`GtBatch`]), worked
//! through in chunks of ground truths when it is large, keeping MMDetection's choice: each
//! point takes the ground truth of minimum area among those it lies inside (or inside the
//! centre region, with `center_sampling`) whose regress range holds its largest distance, the
//! first one on ties; points with none are background. Outputs are `(B, N)` over all points,
//! levels concatenated per image.

use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::task_modules::{
    distance2bbox, promote_kinds, DistancePointBBoxCoder, GtBatch, MlvlPointGenerator,
    CHUNK_ELEMENTS,
};

/// FCOS's `INF`: the area of a ground truth a point may not take, and the open end of the last
/// regress range.
pub const INF: f64 = 1e8;

#[derive(Debug, Deserialize)]
struct FcosConfig {
    #[serde(rename = "type")]
    ty: String,
    num_classes: i64,
    #[serde(default = "default_strides")]
    strides: Vec<f64>,
    #[serde(default = "default_ranges")]
    regress_ranges: Vec<(f64, f64)>,
    #[serde(default)]
    center_sampling: bool,
    #[serde(default = "default_radius")]
    center_sample_radius: f64,
    #[serde(default)]
    norm_on_bbox: bool,
    #[serde(default)]
    bbox_coder: Option<Value>,
}

fn default_strides() -> Vec<f64> {
    vec![4.0, 8.0, 16.0, 32.0, 64.0]
}
fn default_ranges() -> Vec<(f64, f64)> {
    vec![
        (-1.0, 64.0),
        (64.0, 128.0),
        (128.0, 256.0),
        (256.0, 512.0),
        (512.0, INF),
    ]
}
fn default_radius() -> f64 {
    1.5
}

/// The targets of a batch over all `N` points of each image (levels concatenated).
#[derive(Debug)]
pub struct FcosTargets {
    /// `(B, N)` int64: the class of the ground truth a point takes, `num_classes` (background)
    /// elsewhere.
    pub labels: Tensor,
    /// `(B, N, 4)`: the distances (left, top, right, bottom) to the ground truth of minimum
    /// area (for background points, as MMDetection, to the first ground truth; zeros in an
    /// image without any), divided by the level's stride with `norm_on_bbox`.
    pub bbox_targets: Tensor,
    /// `(B, N)` bool: the positives, `labels < num_classes`.
    pub pos_mask: Tensor,
    /// `(B, N)`: `centerness_target` of the positives' box targets, 0 elsewhere.
    pub centerness: Tensor,
    /// 0-dim float32: the number of positives in the batch (`num_pos` before `reduce_mean`).
    pub num_pos: Tensor,
    /// 0-dim: the sum of the positives' centerness targets (before `reduce_mean`).
    pub centerness_sum: Tensor,
    /// Points per level, to split `(B, N, ...)` tensors as MMDetection's per-level lists.
    pub num_level_points: Vec<i64>,
}

impl FcosTargets {
    /// `loss_by_feat`'s two divisors: `max(reduce_mean(num_pos), 1)` for the classification and
    /// centerness losses and `max(reduce_mean(Σ centerness), 1e-6)` for the box loss, through
    /// [`crate::dist::reduce_mean`] (the tensors themselves in one process); on the device.
    pub fn avg_factors(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            crate::dist::reduce_mean(&self.num_pos)?.f_clamp_min(1.0)?,
            crate::dist::reduce_mean(&self.centerness_sum)?.f_clamp_min(1e-6)?,
        ))
    }

    /// Splits a `(B, N, ...)` tensor into the per-level `(B, n_l, ...)` list.
    pub fn levels(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        Ok(t.f_split_with_sizes(self.num_level_points.as_slice(), 1)?)
    }
}

/// What `FCOSHead` computes for its losses before the loss functions, built from the head's
/// config dict (`num_classes`, `strides`, `regress_ranges`, `center_sampling`,
/// `center_sample_radius`, `norm_on_bbox`, `bbox_coder`; layer and loss keys are not read).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::dense_heads::FCOSHeadTargets;
/// use tch_detloss::task_modules::GtBatch;
///
/// let head = FCOSHeadTargets::from_config(&serde_json::json!({
///     "type": "FCOSHead", "num_classes": 3, "strides": [8, 16],
///     "regress_ranges": [[-1, 64], [64, 100000000]], "center_sampling": true}))?;
/// let (points, counts) = head.points(&[(8, 8), (4, 4)], Kind::Float, Device::Cpu)?;
/// let gts = GtBatch::pad(&[Tensor::from_slice(&[8.0f32, 8.0, 40.0, 48.0]).view([1, 4])], &[Tensor::from_slice(&[2i64])])?;
/// let t = head.targets(&points, &counts, &gts)?;
/// assert_eq!(t.labels.size(), [1, 80]);
/// assert!(t.num_pos.double_value(&[]) > 0.0);
/// # anyhow::Ok(())
/// ```
#[derive(Debug)]
pub struct FCOSHeadTargets {
    /// The head's `num_classes` (the background label).
    pub num_classes: i64,
    /// The levels' strides.
    pub strides: Vec<f64>,
    /// Per level, the range of a point's largest distance to its ground truth's sides.
    pub regress_ranges: Vec<(f64, f64)>,
    /// Whether points must lie within `center_sample_radius` strides of the centre.
    pub center_sampling: bool,
    /// The centre region's half size, in strides.
    pub center_sample_radius: f64,
    /// Whether box targets are divided by the level's stride.
    pub norm_on_bbox: bool,
    /// The head's point generator (`MlvlPointGenerator(strides)`, offset 0.5).
    pub prior_generator: MlvlPointGenerator,
    /// The head's box coder.
    pub bbox_coder: DistancePointBBoxCoder,
    /// Above this many `(B, N, chunk)` elements the ground truths are taken in chunks.
    pub chunk_elements: i64,
}

impl FCOSHeadTargets {
    /// Builds it from an `FCOSHead` config dict.
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: FcosConfig =
            serde_json::from_value(config.clone()).context("invalid FCOSHead config")?;
        ensure!(
            c.ty == "FCOSHead",
            "FCOSHeadTargets: an FCOSHead config is needed, got type {:?}",
            c.ty
        );
        ensure!(
            c.num_classes > 0,
            "FCOSHead: num_classes must be > 0, got {}",
            c.num_classes
        );
        ensure!(
            c.regress_ranges.len() == c.strides.len(),
            "FCOSHead: {} regress_ranges for {} strides",
            c.regress_ranges.len(),
            c.strides.len()
        );
        let prior_generator = MlvlPointGenerator::from_config(
            &serde_json::json!({"type": "MlvlPointGenerator", "strides": c.strides}),
        )?;
        let bbox_coder = match &c.bbox_coder {
            Some(cfg) => {
                ensure!(
                    cfg.get("type").and_then(Value::as_str) == Some("DistancePointBBoxCoder"),
                    "FCOSHead: only DistancePointBBoxCoder is supported, got {cfg}"
                );
                DistancePointBBoxCoder::from_config(cfg)?
            }
            None => DistancePointBBoxCoder { clip_border: true },
        };
        Ok(Self {
            num_classes: c.num_classes,
            strides: c.strides,
            regress_ranges: c.regress_ranges,
            center_sampling: c.center_sampling,
            center_sample_radius: c.center_sample_radius,
            norm_on_bbox: c.norm_on_bbox,
            prior_generator,
            bbox_coder,
            chunk_elements: CHUNK_ELEMENTS,
        })
    }

    /// The points of all levels, concatenated `(N, 2)` of `kind` (the box predictions' dtype, as
    /// MMDetection asks), and the count per level.
    pub fn points(
        &self,
        featmap_sizes: &[(i64, i64)],
        kind: Kind,
        device: Device,
    ) -> Result<(Tensor, Vec<i64>)> {
        let levels = self
            .prior_generator
            .grid_priors(featmap_sizes, kind, device, false)?;
        let counts = levels.iter().map(|p| p.size()[0]).collect();
        Ok((Tensor::f_cat(&levels, 0)?, counts))
    }

    /// The targets of a batch for `points` `(N, 2)` split into levels by `num_level_points`.
    pub fn targets(
        &self,
        points: &Tensor,
        num_level_points: &[i64],
        gts: &GtBatch,
    ) -> Result<FcosTargets> {
        let n = points.size().first().copied().unwrap_or(-1);
        ensure!(
            points.dim() == 2 && points.size()[1] == 2,
            "FCOSHead targets: points must be (N, 2), got {:?}",
            points.size()
        );
        ensure!(
            num_level_points.len() == self.strides.len()
                && num_level_points.iter().all(|&c| c >= 0)
                && num_level_points.iter().sum::<i64>() == n,
            "FCOSHead targets: level counts {num_level_points:?} for {n} points and {} levels",
            self.strides.len()
        );
        ensure!(
            points.is_floating_point(),
            "FCOSHead targets: points must be floating point, got {:?}",
            points.kind()
        );
        gts.dims()?;
        let gs = gts.bboxes.size();
        ensure!(
            gs.len() == 3 && gs[2] == 4 && gts.bboxes.is_floating_point(),
            "FCOSHead targets: ground truths must be (B, G, 4) floating point, got {gs:?} {:?}",
            gts.bboxes.kind()
        );
        let (b, g) = (gs[0], gs[1]);
        let dev = points.device();
        ensure!(
            gts.bboxes.device() == dev,
            "FCOSHead targets: points on {dev:?}, ground truths on {:?}",
            gts.bboxes.device()
        );
        // Per point: its level's regress range and centre-sampling radius, in MMDetection's
        // dtypes (the ranges in the points', the radius in the boxes').
        let per_level =
            |vals: &[f64], kind: Kind| super::level_values(num_level_points, vals, kind, dev);
        let lo: Vec<f64> = self.regress_ranges.iter().map(|r| r.0).collect();
        let hi: Vec<f64> = self.regress_ranges.iter().map(|r| r.1).collect();
        let (lo, hi) = (
            per_level(&lo, points.kind())?,
            per_level(&hi, points.kind())?,
        );
        let radius: Vec<f64> = self
            .strides
            .iter()
            .map(|s| s * self.center_sample_radius)
            .collect();
        let radius = per_level(&radius, gts.bboxes.kind())?;
        let (xs, ys) = (
            points.select(1, 0).view([1, -1, 1]),
            points.select(1, 1).view([1, -1, 1]),
        );

        // The ground truth of minimum area each point may take, chunk by chunk of ground truths;
        // a strict `<` across chunks keeps the first on ties, as one `min` does.
        let chunk = (self.chunk_elements / (b * n).max(1)).clamp(1, g.max(1));
        let mut best: Option<(Tensor, Tensor)> = None;
        let mut g0 = 0;
        while g0 < g {
            let len = chunk.min(g - g0);
            let gb = gts.bboxes.narrow(1, g0, len).unsqueeze(1); // (B, 1, c, 4)
            let side = |i: i64| gb.select(-1, i);
            let (x1, y1, x2, y2) = (side(0), side(1), side(2), side(3));
            let areas = (&x2 - &x1) * (&y2 - &y1);
            let targets = Tensor::f_stack(&[&xs - &x1, &ys - &y1, &x2 - &xs, &y2 - &ys], -1)?;
            let inside = if self.center_sampling {
                let r = radius.view([1, -1, 1]);
                let cx = (&x1 + &x2) / 2.0;
                let cy = (&y1 + &y2) / 2.0;
                let (x_min, y_min) = (&cx - &r, &cy - &r);
                let (x_max, y_max) = (&cx + &r, &cy + &r);
                let c0 = x_min.f_where_self(&x_min.f_gt_tensor(&x1)?, &x1)?;
                let c1 = y_min.f_where_self(&y_min.f_gt_tensor(&y1)?, &y1)?;
                let c2 = x2.f_where_self(&x_max.f_gt_tensor(&x2)?, &x_max)?;
                let c3 = y2.f_where_self(&y_max.f_gt_tensor(&y2)?, &y_max)?;
                let center = Tensor::f_stack(&[&xs - c0, &ys - c1, c2 - &xs, c3 - &ys], -1)?;
                center.f_min_dim(-1, false)?.0.f_gt(0.0)?
            } else {
                targets.f_min_dim(-1, false)?.0.f_gt(0.0)?
            };
            let max_dist = targets.f_max_dim(-1, false)?.0;
            let in_range = max_dist
                .f_ge_tensor(&lo.view([1, -1, 1]))?
                .f_logical_and(&max_dist.f_le_tensor(&hi.view([1, -1, 1]))?)?;
            let valid = gts.valid.narrow(1, g0, len).unsqueeze(1);
            let ok = inside.f_logical_and(&in_range)?.f_logical_and(&valid)?;
            let inf = Tensor::f_scalar_tensor(INF, (areas.kind(), dev))?;
            let areas = areas
                .f_expand([b, n, len], false)?
                .f_where_self(&ok, &inf)?;
            let (m, i) = areas.f_min_dim(-1, false)?;
            let i = i + g0;
            best = Some(match best {
                None => (m, i),
                Some((bm, bi)) => {
                    let better = m.f_lt_tensor(&bm)?;
                    (m.f_where_self(&better, &bm)?, i.f_where_self(&better, &bi)?)
                }
            });
            g0 += len;
        }
        let bg = self.num_classes;
        let Some((min_area, idx)) = best else {
            // No ground truth in the whole batch: all background, zero box targets.
            let labels = Tensor::f_full([b, n], bg, (Kind::Int64, dev))?;
            let kind = promote_kinds(&[points.kind(), gts.bboxes.kind()]);
            return self.finish(
                labels,
                Tensor::f_zeros([b, n, 4], (kind, dev))?,
                num_level_points,
            );
        };
        let labels = gts.labels.f_gather(1, &idx, false)?;
        let labels = labels.f_masked_fill(&min_area.f_eq(INF)?, bg)?;
        let chosen =
            gts.bboxes
                .f_gather(1, &idx.unsqueeze(-1).f_expand([b, n, 4], false)?, false)?;
        let (xs, ys) = (xs.view([1, -1]), ys.view([1, -1]));
        let side = |i: i64| chosen.select(-1, i);
        let mut targets = Tensor::f_stack(
            &[&xs - side(0), &ys - side(1), side(2) - &xs, side(3) - &ys],
            -1,
        )?;
        // An image without ground truths: zeros, as MMDetection's early return.
        let has_gt = gts.valid.f_any_dim(1, false)?.view([b, 1, 1]);
        targets = targets.f_where_self(&has_gt, &targets.f_zeros_like()?)?;
        if self.norm_on_bbox {
            let strides = per_level(&self.strides, targets.kind())?;
            targets = targets.f_div(&strides.view([1, -1, 1]))?;
        }
        self.finish(labels, targets, num_level_points)
    }

    fn finish(
        &self,
        labels: Tensor,
        bbox_targets: Tensor,
        num_level_points: &[i64],
    ) -> Result<FcosTargets> {
        let pos_mask = labels.f_lt(self.num_classes)?;
        let centerness = centerness_target(&bbox_targets)?.f_where_self(
            &pos_mask,
            &bbox_targets.f_new_zeros([], (bbox_targets.kind(), bbox_targets.device()))?,
        )?;
        Ok(FcosTargets {
            num_pos: pos_mask.f_sum(Kind::Float)?,
            centerness_sum: centerness.f_sum(centerness.kind())?,
            labels,
            bbox_targets,
            pos_mask,
            centerness,
            num_level_points: num_level_points.to_vec(),
        })
    }

    /// `loss_by_feat`'s decoding of box distances (predictions or targets) at `points`: boxes
    /// `(B, N, 4)` for distances `(B, N, 4)` and points `(N, 2)`, unclipped, as FCOS decodes.
    pub fn decode(&self, points: &Tensor, distances: &Tensor) -> Result<Tensor> {
        let s = distances.size();
        ensure!(
            s.len() == 3,
            "FCOSHead decode: distances must be (B, N, 4), got {s:?}"
        );
        let p = points.f_unsqueeze(0)?.f_expand([s[0], s[1], 2], false)?;
        distance2bbox(&p, distances, None)
    }
}

/// `FCOSHead.centerness_target`: `sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))` of box
/// targets `(..., 4)`.
pub fn centerness_target(bbox_targets: &Tensor) -> Result<Tensor> {
    let side = |i: i64| bbox_targets.select(-1, i);
    let lr = Tensor::f_stack(&[side(0), side(2)], -1)?;
    let tb = Tensor::f_stack(&[side(1), side(3)], -1)?;
    let ratio = |t: &Tensor| -> Result<Tensor> {
        Ok(t.f_min_dim(-1, false)?
            .0
            .f_div(&t.f_max_dim(-1, false)?.0)?)
    };
    Ok((ratio(&lr)? * ratio(&tb)?).f_sqrt()?)
}
