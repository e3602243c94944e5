//! MMDetection's `AnchorGenerator` and `anchor_inside_flags`
//! (`mmdet/models/task_modules/prior_generators/`).
//!
//! The base anchors are computed in float32 whatever dtype the grid is asked for, as MMDetection
//! computes them, so that float64 grids are the widened float32 anchors plus float64 shifts.
//!
//! ```
//! use tch::{Device, Kind};
//! use tch_detloss::task_modules::AnchorGenerator;
//!
//! let gen = AnchorGenerator::from_config(&serde_json::json!({
//!     "type": "AnchorGenerator", "ratios": [1.0], "octave_base_scale": 8,
//!     "scales_per_octave": 1, "strides": [8, 16]}))?;
//! let anchors = gen.grid_priors(&[(4, 4), (2, 2)], Kind::Float, Device::Cpu)?;
//! assert_eq!(anchors[0].size(), [16, 4]);
//! assert_eq!(Vec::<f32>::try_from(anchors[1].get(0))?, [-64.0, -64.0, 64.0, 64.0]);
//! # anyhow::Ok(())
//! ```

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::registry::parse_config;

/// A stride as a config gives it: one number for both axes, or `[w, h]`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(untagged)]
enum Stride {
    Square(f64),
    Pair(f64, f64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    strides: Vec<Stride>,
    ratios: Vec<f64>,
    #[serde(default)]
    scales: Option<Vec<f64>>,
    #[serde(default)]
    base_sizes: Option<Vec<f64>>,
    #[serde(default = "yes")]
    scale_major: bool,
    #[serde(default)]
    octave_base_scale: Option<f64>,
    #[serde(default)]
    scales_per_octave: Option<i64>,
    #[serde(default)]
    centers: Option<Vec<(f64, f64)>>,
    #[serde(default)]
    center_offset: f64,
    #[serde(default)]
    use_box_type: bool,
}

fn yes() -> bool {
    true
}

/// MMDetection's `AnchorGenerator`: per level, base anchors (`ratios` × `scales`) around a centre,
/// shifted over the feature grid by the level's stride.
#[derive(Debug)]
pub struct AnchorGenerator {
    strides: Vec<(f64, f64)>,
    scales: Vec<f32>,
    ratios: Vec<f32>,
    base_anchors: Vec<Tensor>,
}

impl AnchorGenerator {
    /// Builds it from its config dict (`strides`, `ratios`, `scales` or `octave_base_scale` with
    /// `scales_per_octave`, `base_sizes`, `scale_major`, `centers`, `center_offset`).
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: Config = parse_config(config)?;
        ensure!(
            !c.use_box_type,
            "AnchorGenerator: use_box_type is not supported (anchors are plain tensors)"
        );
        ensure!(!c.strides.is_empty(), "AnchorGenerator: strides is empty");
        if c.center_offset != 0.0 {
            ensure!(
                c.centers.is_none(),
                "AnchorGenerator: centers cannot be set when center_offset != 0"
            );
        }
        ensure!(
            (0.0..=1.0).contains(&c.center_offset),
            "AnchorGenerator: center_offset should be in [0, 1], got {}",
            c.center_offset
        );
        let strides = stride_pairs(&c.strides, "AnchorGenerator")?;
        let base_sizes = c
            .base_sizes
            .unwrap_or_else(|| strides.iter().map(|&(w, h)| w.min(h)).collect());
        ensure!(
            base_sizes.len() == strides.len(),
            "AnchorGenerator: {} base_sizes for {} strides",
            base_sizes.len(),
            strides.len()
        );
        if let Some(centers) = &c.centers {
            ensure!(
                centers.len() == strides.len(),
                "AnchorGenerator: {} centers for {} strides",
                centers.len(),
                strides.len()
            );
        }
        // torch.Tensor(list) and torch.Tensor(np.array(...)): float64 values rounded to float32.
        let scales: Vec<f32> = match (c.scales, c.octave_base_scale, c.scales_per_octave) {
            (Some(s), None, None) => s.iter().map(|&v| v as f32).collect(),
            (None, Some(obs), Some(spo)) if spo > 0 => {
                (0..spo).map(|i| (2f64.powf(i as f64 / spo as f64) * obs) as f32).collect()
            }
            _ => bail!(
                "AnchorGenerator: set either scales, or octave_base_scale with scales_per_octave (> 0)"
            ),
        };
        ensure!(
            !scales.is_empty() && !c.ratios.is_empty(),
            "AnchorGenerator: scales and ratios must not be empty"
        );
        let ratios: Vec<f32> = c.ratios.iter().map(|&v| v as f32).collect();
        ensure!(
            ratios.iter().all(|&r| r > 0.0),
            "AnchorGenerator: ratios must be positive, got {ratios:?}"
        );
        let base_anchors = base_sizes
            .iter()
            .enumerate()
            .map(|(l, &size)| {
                let center = match &c.centers {
                    Some(cs) => cs[l],
                    None => (c.center_offset * size, c.center_offset * size),
                };
                level_base_anchors(size, &scales, &ratios, c.scale_major, center)
            })
            .collect();
        Ok(Self {
            strides,
            scales,
            ratios,
            base_anchors,
        })
    }

    /// The number of pyramid levels.
    pub fn num_levels(&self) -> usize {
        self.strides.len()
    }

    /// Anchors per grid location, per level.
    pub fn num_base_priors(&self) -> Vec<i64> {
        self.base_anchors.iter().map(|b| b.size()[0]).collect()
    }

    /// The strides `(w, h)`, per level.
    pub fn strides(&self) -> &[(f64, f64)] {
        &self.strides
    }

    /// The scales, as float32 (MMDetection's `scales` tensor).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The ratios, as float32.
    pub fn ratios(&self) -> &[f32] {
        &self.ratios
    }

    /// The base anchors of each level, `(A, 4)` float32 on the CPU.
    pub fn base_anchors(&self) -> &[Tensor] {
        &self.base_anchors
    }

    /// The anchors of each level for feature maps of `(h, w)`: `(h * w * A, 4)` of `kind` on
    /// `device`, location-major (rows, then columns, then the level's base anchors).
    pub fn grid_priors(
        &self,
        featmap_sizes: &[(i64, i64)],
        kind: Kind,
        device: Device,
    ) -> Result<Vec<Tensor>> {
        self.check_levels(featmap_sizes)?;
        float_kind(kind)?;
        featmap_sizes
            .iter()
            .zip(&self.strides)
            .zip(&self.base_anchors)
            .map(|((&(h, w), &(sw, sh)), base)| {
                let base = base.f_to_device(device)?.f_to_kind(kind)?;
                let sx = Tensor::f_arange(w, (Kind::Int64, device))?.f_to_kind(kind)? * sw;
                let sy = Tensor::f_arange(h, (Kind::Int64, device))?.f_to_kind(kind)? * sh;
                let xx = sx.f_repeat([h])?;
                let yy = sy.f_view([-1, 1])?.f_repeat([1, w])?.f_view([-1])?;
                let shifts = Tensor::f_stack(&[&xx, &yy, &xx, &yy], -1)?;
                Ok((base.f_unsqueeze(0)? + shifts.f_unsqueeze(1)?).f_view([-1, 4])?)
            })
            .collect()
    }

    /// Which anchors of each level lie on the padded image (`pad_shape` = `(h, w)`): the grid
    /// rows and columns beyond `ceil(pad / stride)` are invalid. Bool, as `grid_priors` orders.
    pub fn valid_flags(
        &self,
        featmap_sizes: &[(i64, i64)],
        pad_shape: (i64, i64),
        device: Device,
    ) -> Result<Vec<Tensor>> {
        self.check_levels(featmap_sizes)?;
        featmap_sizes
            .iter()
            .zip(&self.strides)
            .zip(self.num_base_priors())
            .map(|((&(h, w), &stride), a)| {
                Ok(grid_valid_flags((h, w), stride, pad_shape, device)?
                    .f_view([-1, 1])?
                    .f_expand([h * w, a], false)?
                    .f_contiguous()?
                    .f_view([-1])?)
            })
            .collect()
    }

    fn check_levels(&self, featmap_sizes: &[(i64, i64)]) -> Result<()> {
        check_levels(featmap_sizes, self.num_levels(), "anchor")
    }
}

/// One level's base anchors, in float32 arithmetic as MMDetection's
/// `gen_single_level_base_anchors`.
fn level_base_anchors(
    size: f64,
    scales: &[f32],
    ratios: &[f32],
    scale_major: bool,
    center: (f64, f64),
) -> Tensor {
    let scales = Tensor::from_slice(scales);
    let h_ratios = Tensor::from_slice(ratios).sqrt();
    let w_ratios = h_ratios.reciprocal();
    let (ws, hs) = if scale_major {
        (
            (w_ratios * size).unsqueeze(1) * scales.unsqueeze(0),
            (h_ratios * size).unsqueeze(1) * scales.unsqueeze(0),
        )
    } else {
        (
            (&scales * size).unsqueeze(1) * w_ratios.unsqueeze(0),
            (&scales * size).unsqueeze(1) * h_ratios.unsqueeze(0),
        )
    };
    let (hw, hh) = (ws.view([-1]) * 0.5, hs.view([-1]) * 0.5);
    // x_center - 0.5 * ws: the Python float is rounded to float32 first, as torch does.
    Tensor::stack(
        &[
            -&hw + center.0,
            -&hh + center.1,
            hw + center.0,
            hh + center.1,
        ],
        -1,
    )
}

/// MMDetection's `anchor_inside_flags`: `valid_flags` and, where `allowed_border >= 0`, the
/// anchor within the image (`img_shape` = `(h, w)`) grown by `allowed_border`, with a strict `<`
/// on the far sides. A negative `allowed_border` returns `valid_flags`.
pub fn anchor_inside_flags(
    flat_anchors: &Tensor,
    valid_flags: &Tensor,
    img_shape: (i64, i64),
    allowed_border: f64,
) -> Result<Tensor> {
    ensure!(
        flat_anchors.dim() == 2 && flat_anchors.size()[1] == 4,
        "anchor_inside_flags: anchors must be (n, 4), got {:?}",
        flat_anchors.size()
    );
    ensure!(
        valid_flags.size() == [flat_anchors.size()[0]],
        "anchor_inside_flags: valid_flags {:?} for {} anchors",
        valid_flags.size(),
        flat_anchors.size()[0]
    );
    let valid = valid_flags
        .f_to_kind(Kind::Bool)
        .context("anchor_inside_flags: valid_flags")?;
    if allowed_border < 0.0 {
        return Ok(valid);
    }
    let col = |j: i64| flat_anchors.select(1, j);
    let (h, w) = (img_shape.0 as f64, img_shape.1 as f64);
    Ok(valid
        .f_logical_and(&col(0).f_ge(-allowed_border)?)?
        .f_logical_and(&col(1).f_ge(-allowed_border)?)?
        .f_logical_and(&col(2).f_lt(w + allowed_border)?)?
        .f_logical_and(&col(3).f_lt(h + allowed_border)?)?)
}

/// Strides as `(w, h)` pairs, all positive.
fn stride_pairs(strides: &[Stride], who: &str) -> Result<Vec<(f64, f64)>> {
    let pairs: Vec<(f64, f64)> = strides
        .iter()
        .map(|s| match *s {
            Stride::Square(v) => (v, v),
            Stride::Pair(w, h) => (w, h),
        })
        .collect();
    ensure!(
        pairs.iter().all(|&(w, h)| w > 0.0 && h > 0.0),
        "{who}: strides must be positive, got {pairs:?}"
    );
    Ok(pairs)
}

/// Priors come in a floating kind.
fn float_kind(kind: Kind) -> Result<()> {
    ensure!(
        matches!(
            kind,
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        ),
        "grid_priors: a floating kind is needed, got {kind:?}"
    );
    Ok(())
}

/// One size `(h, w)` per level, none negative.
fn check_levels(featmap_sizes: &[(i64, i64)], levels: usize, what: &str) -> Result<()> {
    ensure!(
        featmap_sizes.len() == levels,
        "{} feature map sizes for {levels} {what} levels",
        featmap_sizes.len()
    );
    ensure!(
        featmap_sizes.iter().all(|&(h, w)| h >= 0 && w >= 0),
        "negative feature map size in {featmap_sizes:?}"
    );
    Ok(())
}

/// The grid locations `(h * w,)`, row-major, that lie on the padded image: rows and columns
/// below `ceil(pad / stride)` (MMDetection's `valid_flags` of both generators).
fn grid_valid_flags(
    (h, w): (i64, i64),
    (sw, sh): (f64, f64),
    pad_shape: (i64, i64),
    device: Device,
) -> Result<Tensor> {
    let vh = ((pad_shape.0 as f64 / sh).ceil() as i64).min(h);
    let vw = ((pad_shape.1 as f64 / sw).ceil() as i64).min(w);
    let vx = Tensor::f_arange(w, (Kind::Int64, device))?.f_lt(vw)?;
    let vy = Tensor::f_arange(h, (Kind::Int64, device))?.f_lt(vh)?;
    Ok(vy
        .f_view([-1, 1])?
        .f_logical_and(&vx.f_view([1, -1])?)?
        .f_view([-1])?)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PointConfig {
    strides: Vec<Stride>,
    #[serde(default = "half")]
    offset: f64,
}

fn half() -> f64 {
    0.5
}

/// MMDetection's `MlvlPointGenerator` (`prior_generators/point_generator.py`): one point per
/// feature-map location, `(j + offset) * stride_w, (i + offset) * stride_h`, for FCOS, GFL's
/// point variants, RTMDet and TOOD.
///
/// As MMDetection's, the coordinates are computed in float32 (an int64 grid plus a float offset)
/// and then cast to the asked-for kind, so float64 points are widened float32 values.
///
/// ```
/// use tch::{Device, Kind};
/// use tch_detloss::task_modules::MlvlPointGenerator;
///
/// let gen = MlvlPointGenerator::from_config(&serde_json::json!({
///     "type": "MlvlPointGenerator", "strides": [8, 16], "offset": 0.0}))?;
/// let points = gen.grid_priors(&[(2, 3), (1, 2)], Kind::Float, Device::Cpu, true)?;
/// assert_eq!(points[0].size(), [6, 4]);
/// assert_eq!(Vec::<f32>::try_from(points[0].get(4))?, [8.0, 8.0, 8.0, 8.0]);
/// # anyhow::Ok(())
/// ```
#[derive(Clone, Debug)]
pub struct MlvlPointGenerator {
    strides: Vec<(f64, f64)>,
    /// The offset of the points in each cell, in strides (0.5: the cell centres).
    pub offset: f64,
}

impl MlvlPointGenerator {
    /// Builds it from its config dict (`strides`, each a number or `[w, h]`; `offset`, default
    /// 0.5).
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: PointConfig = parse_config(config)?;
        ensure!(
            !c.strides.is_empty(),
            "MlvlPointGenerator: strides is empty"
        );
        let strides = stride_pairs(&c.strides, "MlvlPointGenerator")?;
        ensure!(
            c.offset.is_finite(),
            "MlvlPointGenerator: offset must be finite, got {}",
            c.offset
        );
        Ok(Self {
            strides,
            offset: c.offset,
        })
    }

    /// The number of pyramid levels.
    pub fn num_levels(&self) -> usize {
        self.strides.len()
    }

    /// Points per grid location, per level: 1.
    pub fn num_base_priors(&self) -> Vec<i64> {
        vec![1; self.strides.len()]
    }

    /// The strides `(w, h)`, per level.
    pub fn strides(&self) -> &[(f64, f64)] {
        &self.strides
    }

    /// The points of each level for feature maps of `(h, w)`: `(h * w, 2)` rows `(x, y)` of
    /// `kind` on `device`, row-major, or `(h * w, 4)` rows `(x, y, stride_w, stride_h)` when
    /// `with_stride`.
    pub fn grid_priors(
        &self,
        featmap_sizes: &[(i64, i64)],
        kind: Kind,
        device: Device,
        with_stride: bool,
    ) -> Result<Vec<Tensor>> {
        self.check_levels(featmap_sizes)?;
        (0..self.num_levels())
            .map(|l| self.single_level_grid_priors(featmap_sizes[l], l, kind, device, with_stride))
            .collect()
    }

    /// [`grid_priors`](Self::grid_priors) of level `level` alone.
    pub fn single_level_grid_priors(
        &self,
        (h, w): (i64, i64),
        level: usize,
        kind: Kind,
        device: Device,
        with_stride: bool,
    ) -> Result<Tensor> {
        let &(sw, sh) = self
            .strides
            .get(level)
            .with_context(|| format!("grid_priors: no level {level}"))?;
        ensure!(
            h >= 0 && w >= 0,
            "grid_priors: negative feature map size ({h}, {w})"
        );
        float_kind(kind)?;
        // int64 + float gives float32 in torch, as MMDetection's `(arange + offset) * stride`.
        let coord = |n: i64, s: f64| -> Result<Tensor> {
            Ok(Tensor::f_arange(n, (Kind::Int64, device))?
                .f_add_scalar(self.offset)?
                .f_mul_scalar(s)?
                .f_to_kind(kind)?)
        };
        let (sx, sy) = (coord(w, sw)?, coord(h, sh)?);
        let xx = sx.f_repeat([h])?;
        let yy = sy.f_view([-1, 1])?.f_repeat([1, w])?.f_view([-1])?;
        let mut cols = vec![xx, yy];
        if with_stride {
            for s in [sw, sh] {
                cols.push(Tensor::f_full([h * w], s, (kind, device))?);
            }
        }
        Ok(Tensor::f_stack(&cols, -1)?)
    }

    /// Which points of each level lie on the padded image (`pad_shape` = `(h, w)`): the grid
    /// rows and columns beyond `ceil(pad / stride)` are invalid. Bool, as `grid_priors` orders.
    pub fn valid_flags(
        &self,
        featmap_sizes: &[(i64, i64)],
        pad_shape: (i64, i64),
        device: Device,
    ) -> Result<Vec<Tensor>> {
        self.check_levels(featmap_sizes)?;
        featmap_sizes
            .iter()
            .zip(&self.strides)
            .map(|(&hw, &stride)| grid_valid_flags(hw, stride, pad_shape, device))
            .collect()
    }

    /// The points of the locations `prior_idxs` (int64 indices into level `level`'s row-major
    /// grid of `(h, w)`): `(N, 2)` of `kind`, as MMDetection's `sparse_priors`.
    pub fn sparse_priors(
        &self,
        prior_idxs: &Tensor,
        (h, w): (i64, i64),
        level: usize,
        kind: Kind,
    ) -> Result<Tensor> {
        let &(sw, sh) = self
            .strides
            .get(level)
            .with_context(|| format!("sparse_priors: no level {level}"))?;
        ensure!(
            prior_idxs.kind() == Kind::Int64,
            "sparse_priors: int64 indices are needed, got {:?}",
            prior_idxs.kind()
        );
        ensure!(
            h > 0 && w > 0,
            "sparse_priors: empty feature map ({h}, {w})"
        );
        let x = prior_idxs
            .f_remainder(w)?
            .f_add_scalar(self.offset)?
            .f_mul_scalar(sw)?;
        let y = prior_idxs
            .f_floor_divide_scalar(w)?
            .f_remainder(h)?
            .f_add_scalar(self.offset)?
            .f_mul_scalar(sh)?;
        Ok(Tensor::f_stack(&[x, y], 1)?.f_to_kind(kind)?)
    }

    fn check_levels(&self, featmap_sizes: &[(i64, i64)]) -> Result<()> {
        check_levels(featmap_sizes, self.num_levels(), "point")
    }
}
