//! The training targets of MMDetection's dense heads, batched over images as masks over all
//! priors: the anchor-based heads here (`mmdet/models/dense_heads/anchor_head.py` and
//! `atss_head.py`: `get_targets`), GFL's loss inputs in [`GFLHeadTargets`] (`gfl_head.py`), FCOS's
//! in [`FCOSHeadTargets`] (`fcos_head.py`), RTMDet's in [`RTMDetHeadTargets`] (`rtmdet_head.py`),
//! TOOD's in [`TOODHeadTargets`] (`tood_head.py`).
//!
//! MMDetection runs its heads' target code image by image on the anchors inside each image and
//! then maps the results back to all anchors. Here the assigner sees all anchors with a
//! `(B, N)` inside mask instead, the sampler returns masks, and every target is a `(B, N)` or
//! `(B, N, 4)` tensor built with `where` and `gather`: no host read, and the same values.
//! `avg_factor`, `Σ_images max(#pos_i, 1)` (plus the negatives for samplers that count them), is
//! a 0-dim device tensor that the fused losses take directly.
//!
//! One difference: where no anchor of an image lies inside it, MMDetection raises; here that
//! image gets zero weights everywhere (checking would be a host read).

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

mod fcos;
mod gfl;
mod rtmdet;
mod tood;
pub use fcos::{centerness_target as fcos_centerness_target, FCOSHeadTargets, FcosTargets, INF};
pub use gfl::{GFLHeadTargets, GflLossInputs};
pub use rtmdet::{RTMDetHeadTargets, RtmdetTargets};
pub use tood::{TOODHeadTargets, ToodTargets};

use crate::task_modules::{
    centres, ATSSAssigner, AnchorGenerator, AssignResult, DeltaXYWHBBoxCoder, GtBatch,
    MaxIoUAssigner, PseudoSampler, RandomSampler, SampleMode, Sampler, SamplingResult,
};

/// The anchors of all levels `(N, 4)` float32, their valid flags per image `(B, N)` and the count
/// per level.
fn grid_anchors(
    generator: &AnchorGenerator,
    featmap_sizes: &[(i64, i64)],
    metas: &[ImageMeta],
    device: Device,
) -> Result<(Tensor, Tensor, Vec<i64>)> {
    let levels = generator.grid_priors(featmap_sizes, Kind::Float, device)?;
    let counts = levels.iter().map(|t| t.size()[0]).collect();
    let flags = image_flags(metas, |pad| {
        generator.valid_flags(featmap_sizes, pad, device)
    })?;
    Ok((Tensor::f_cat(&levels, 0)?, flags, counts))
}

/// Per prior `(N,)`: the value of its level, for levels of `counts` priors.
fn level_values(counts: &[i64], values: &[f64], kind: Kind, device: Device) -> Result<Tensor> {
    let parts = counts
        .iter()
        .zip(values)
        .map(|(&c, &v)| Tensor::f_full([c], v, (kind, device)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::f_cat(&parts, 0)?)
}

/// Each image's valid flags of all levels, `(B, N)`: `level_flags(pad_shape)` per image,
/// concatenated over the levels.
fn image_flags(
    metas: &[ImageMeta],
    level_flags: impl Fn((i64, i64)) -> Result<Vec<Tensor>>,
) -> Result<Tensor> {
    let flags = metas
        .iter()
        .map(|m| Ok(Tensor::f_cat(&level_flags(m.pad_shape)?, 0)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::f_stack(&flags, 0)?)
}

/// An image's size as MMDetection's `img_metas` give it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageMeta {
    /// `(h, w)` of the image itself: anchors beyond it are outside.
    pub img_shape: (i64, i64),
    /// `(h, w)` after padding: anchors of grid cells beyond it are invalid.
    pub pad_shape: (i64, i64),
}

/// The targets of a batch, over all `N` anchors of each image (levels concatenated).
#[derive(Debug)]
pub struct HeadTargets {
    /// `(B, N)` int64: the class of each positive, `num_classes` (background) elsewhere.
    pub labels: Tensor,
    /// `(B, N)` float32: 1 (or `pos_weight`) at positives, 1 at negatives, 0 elsewhere.
    pub label_weights: Tensor,
    /// `(B, N, 4)` in the anchors' dtype: the box targets of positives (gt boxes, or their
    /// deltas from the anchor where the head regresses deltas), 0 elsewhere.
    pub bbox_targets: Tensor,
    /// `(B, N, 4)`: 1 on positives, 0 elsewhere.
    pub bbox_weights: Tensor,
    /// 0-dim float32 on the anchors' device: the `avg_factor` of the classification loss.
    pub avg_factor: Tensor,
    /// `(B, N)` bool: anchors inside each image (and valid).
    pub inside: Tensor,
    /// `(B, N, 4)`: the anchors, zero where outside (ATSS's `anchors` output).
    pub anchors: Tensor,
    /// `(B, N)`: ATSS's centerness targets (`centerness_target` of each positive anchor and its
    /// gt box), 0 off the positives: the box loss's weights and the centerness loss's targets.
    /// Computed where the box targets are gt boxes (`reg_decoded_bbox`); zeros otherwise.
    pub centerness: Tensor,
    /// The assignment over all anchors (-1 outside).
    pub assign: AssignResult,
    /// The sample.
    pub sampling: SamplingResult,
    /// Anchors per level, to split `(B, N, ...)` tensors as MMDetection's per-level lists.
    pub num_level_anchors: Vec<i64>,
}

impl HeadTargets {
    /// Splits a `(B, N, ...)` tensor into MMDetection's per-level `(B, n_l, ...)` list.
    pub fn levels(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        Ok(t.f_split_with_sizes(self.num_level_anchors.as_slice(), 1)?)
    }
}

#[derive(Debug, Deserialize)]
struct HeadConfig {
    #[serde(rename = "type")]
    ty: String,
    num_classes: i64,
    #[serde(default)]
    anchor_generator: Option<Value>,
    #[serde(default)]
    bbox_coder: Option<Value>,
    #[serde(default)]
    reg_decoded_bbox: Option<bool>,
    train_cfg: Option<TrainConfig>,
}

/// A dense head's `train_cfg` (what the targets read of it).
#[derive(Debug, Deserialize)]
struct TrainConfig {
    assigner: Value,
    #[serde(default)]
    sampler: Option<Value>,
    #[serde(default = "minus_one")]
    allowed_border: f64,
    #[serde(default = "minus_one")]
    pos_weight: f64,
    #[serde(default)]
    #[allow(dead_code)]
    debug: bool,
}

fn minus_one() -> f64 {
    -1.0
}

enum Assigner {
    Atss(ATSSAssigner),
    MaxIoU(MaxIoUAssigner),
}

enum SamplerChoice {
    Pseudo(PseudoSampler),
    Random(RandomSampler),
}

/// What `get_targets` of `ATSSHead`, `RetinaHead` or `AnchorHead` computes, built from the head's
/// config dict (its `num_classes`, `anchor_generator`, `bbox_coder`, `reg_decoded_bbox` and
/// `train_cfg`; the layer and loss keys are not read here).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::dense_heads::{DenseHeadTargets, ImageMeta};
/// use tch_detloss::task_modules::GtBatch;
///
/// let head = DenseHeadTargets::from_config(&serde_json::json!({
///     "type": "ATSSHead", "num_classes": 3,
///     "anchor_generator": {"type": "AnchorGenerator", "ratios": [1.0], "octave_base_scale": 8,
///                          "scales_per_octave": 1, "strides": [8, 16]},
///     "bbox_coder": {"type": "DeltaXYWHBBoxCoder", "target_means": [0, 0, 0, 0], "target_stds": [0.1, 0.1, 0.2, 0.2]},
///     "train_cfg": {"assigner": {"type": "ATSSAssigner", "topk": 9}, "allowed_border": -1, "pos_weight": -1}}))?;
/// let metas = [ImageMeta { img_shape: (64, 64), pad_shape: (64, 64) }];
/// let gts = GtBatch::pad(&[Tensor::from_slice(&[8.0f32, 8.0, 40.0, 48.0]).view([1, 4])], &[Tensor::from_slice(&[2i64])])?;
/// let t = head.get_targets(&[(8, 8), (4, 4)], &metas, &gts, None, Device::Cpu)?;
/// assert_eq!(t.labels.size(), [1, 80]);
/// assert!(t.avg_factor.double_value(&[]) >= 1.0);
/// # anyhow::Ok(())
/// ```
pub struct DenseHeadTargets {
    /// The head's `num_classes` (the background label).
    pub num_classes: i64,
    /// The head's anchor generator.
    pub anchor_generator: AnchorGenerator,
    /// The head's box coder.
    pub bbox_coder: DeltaXYWHBBoxCoder,
    /// Box targets are gt boxes (true) or their deltas from the anchors (false).
    pub reg_decoded_bbox: bool,
    /// `train_cfg.allowed_border`.
    pub allowed_border: f64,
    /// `train_cfg.pos_weight`.
    pub pos_weight: f64,
    assigner: Assigner,
    sampler: SamplerChoice,
}

impl DenseHeadTargets {
    /// Builds it from an `ATSSHead`, `GFLHead` (whose targets are ATSSHead's), `RetinaHead` or
    /// `AnchorHead` config dict with a `train_cfg`.
    pub fn from_config(config: &Value) -> Result<Self> {
        let c: HeadConfig =
            serde_json::from_value(config.clone()).context("invalid head config")?;
        let atss = match c.ty.as_str() {
            "ATSSHead" | "GFLHead" => true,
            "RetinaHead" | "AnchorHead" => false,
            t => bail!("unsupported head type {t:?} (ATSSHead, GFLHead, RetinaHead, AnchorHead)"),
        };
        ensure!(
            c.num_classes > 0,
            "{}: num_classes must be > 0, got {}",
            c.ty,
            c.num_classes
        );
        let train = c
            .train_cfg
            .with_context(|| format!("{}: targets need a train_cfg", c.ty))?;
        let default_anchors = serde_json::json!({"type": "AnchorGenerator", "scales": [8, 16, 32],
            "ratios": [0.5, 1.0, 2.0], "strides": [4, 8, 16, 32, 64]});
        let anchor_generator =
            AnchorGenerator::from_config(c.anchor_generator.as_ref().unwrap_or(&default_anchors))?;
        let bbox_coder = match &c.bbox_coder {
            Some(cfg) => {
                ensure!(
                    cfg.get("type").and_then(Value::as_str) == Some("DeltaXYWHBBoxCoder"),
                    "{}: only DeltaXYWHBBoxCoder is supported, got {cfg}",
                    c.ty
                );
                DeltaXYWHBBoxCoder::from_config(cfg)?
            }
            None => DeltaXYWHBBoxCoder::from_config(&serde_json::json!({}))?,
        };
        let assigner = match train.assigner.get("type").and_then(Value::as_str) {
            Some("ATSSAssigner") => Assigner::Atss(ATSSAssigner::from_config(&train.assigner)?),
            Some("MaxIoUAssigner") => {
                Assigner::MaxIoU(MaxIoUAssigner::from_config(&train.assigner)?)
            }
            other => bail!(
                "{}: unsupported assigner {other:?} (ATSSAssigner, MaxIoUAssigner)",
                c.ty
            ),
        };
        let sampler = match &train.sampler {
            None => SamplerChoice::Pseudo(PseudoSampler),
            Some(s) => match s.get("type").and_then(Value::as_str) {
                Some("PseudoSampler") => SamplerChoice::Pseudo(PseudoSampler::from_config(s)?),
                Some("RandomSampler") => {
                    let r = RandomSampler::from_config(s)?;
                    ensure!(
                        !r.add_gt_as_proposals,
                        "{}: a dense head's RandomSampler cannot add ground truths as proposals \
                         (its indices would not be anchors); set add_gt_as_proposals to false",
                        c.ty
                    );
                    SamplerChoice::Random(r)
                }
                other => bail!(
                    "{}: unsupported sampler {other:?} (PseudoSampler, RandomSampler)",
                    c.ty
                ),
            },
        };
        Ok(Self {
            num_classes: c.num_classes,
            anchor_generator,
            bbox_coder,
            reg_decoded_bbox: c.reg_decoded_bbox.unwrap_or(atss),
            allowed_border: train.allowed_border,
            pos_weight: train.pos_weight,
            assigner,
            sampler,
        })
    }

    /// The same targets with the random sampler drawing in `mode` (no effect with a
    /// `PseudoSampler`).
    pub fn with_sample_mode(mut self, mode: SampleMode) -> Self {
        if let SamplerChoice::Random(r) = self.sampler {
            self.sampler = SamplerChoice::Random(r.with_mode(mode));
        }
        self
    }

    /// The anchors of all levels for feature maps of `featmap_sizes` (`(h, w)` per level),
    /// concatenated `(N, 4)` float32, and each image's valid flags `(B, N)` from its pad shape.
    pub fn anchors(
        &self,
        featmap_sizes: &[(i64, i64)],
        metas: &[ImageMeta],
        device: Device,
    ) -> Result<(Tensor, Tensor, Vec<i64>)> {
        grid_anchors(&self.anchor_generator, featmap_sizes, metas, device)
    }

    /// `get_targets` for feature maps of `featmap_sizes`: anchors and valid flags from the head's
    /// generator, then [`targets_for`](Self::targets_for).
    pub fn get_targets(
        &self,
        featmap_sizes: &[(i64, i64)],
        metas: &[ImageMeta],
        gts: &GtBatch,
        ignore: Option<&GtBatch>,
        device: Device,
    ) -> Result<HeadTargets> {
        let (anchors, valid, counts) = self.anchors(featmap_sizes, metas, device)?;
        self.targets_for(&anchors, &counts, &valid, metas, gts, ignore)
    }

    /// The targets of `B` images over given anchors `(N, 4)` (levels of `num_level_anchors`),
    /// their valid flags `(B, N)` and image sizes, against the padded ground truths.
    pub fn targets_for(
        &self,
        anchors: &Tensor,
        num_level_anchors: &[i64],
        valid_flags: &Tensor,
        metas: &[ImageMeta],
        gts: &GtBatch,
        ignore: Option<&GtBatch>,
    ) -> Result<HeadTargets> {
        let (b, _) = gts.dims()?;
        ensure!(
            anchors.dim() == 2 && anchors.size()[1] == 4,
            "anchors must be (N, 4), got {:?}",
            anchors.size()
        );
        let n = anchors.size()[0];
        ensure!(
            metas.len() as i64 == b && valid_flags.size() == [b, n],
            "{} image metas and valid flags {:?} for {b} images of {n} anchors",
            metas.len(),
            valid_flags.size()
        );
        let (kind, dev) = (anchors.kind(), anchors.device());
        let inside = inside_flags(anchors, valid_flags, metas, self.allowed_border)?;
        let assign = match &self.assigner {
            Assigner::Atss(a) => {
                a.assign(anchors, num_level_anchors, gts, ignore, Some(&inside))?
            }
            Assigner::MaxIoU(a) => a.assign(anchors, gts, ignore, Some(&inside))?,
        };
        let sampling = match &self.sampler {
            SamplerChoice::Pseudo(s) => s.sample(&assign, Some(gts))?,
            SamplerChoice::Random(s) => s.sample(&assign, Some(gts))?,
        };
        let pos = &sampling.pos_mask;
        let neg = &sampling.neg_mask;
        let gt_idx = (&assign.gt_inds - 1)
            .f_clamp_min(0)?
            .f_unsqueeze(2)?
            .f_expand([b, n, 4], false)?;
        let gt_boxes = gts.bboxes.f_to_kind(kind)?;
        let assigned = if gts.bboxes.size()[1] > 0 {
            gt_boxes.f_gather(1, &gt_idx, false)?
        } else {
            Tensor::f_zeros([b, n, 4], (kind, dev))?
        };
        let all_anchors = anchors.f_unsqueeze(0)?.f_expand([b, n, 4], false)?;
        let targets = if self.reg_decoded_bbox {
            assigned
        } else {
            self.bbox_coder
                .encode(&all_anchors, &assigned)?
                .f_to_kind(kind)?
        };
        let pos4 = pos.f_unsqueeze(2)?;
        let zeros = Tensor::f_zeros([b, n, 4], (kind, dev))?;
        let bbox_targets = targets.f_where_self(&pos4, &zeros)?;
        let bbox_weights = pos4.f_expand([b, n, 4], false)?.f_to_kind(kind)?;
        let labels = assign.labels.f_where_scalarother(pos, self.num_classes)?;
        let pos_w = if self.pos_weight <= 0.0 {
            1.0
        } else {
            self.pos_weight
        };
        let label_weights = Tensor::f_zeros([b, n], (Kind::Float, dev))?
            .f_masked_fill(neg, 1.0)?
            .f_masked_fill(pos, pos_w)?;
        let avg_factor = sampling.avg_factor().f_to_kind(Kind::Float)?;
        let anchors_out = all_anchors.f_where_self(&inside.f_unsqueeze(2)?, &zeros)?;
        let no_centre = Tensor::f_zeros([b, n], (kind, dev))?;
        let centerness = if self.reg_decoded_bbox {
            centerness_target(
                &anchors_out.f_reshape([-1, 4])?,
                &bbox_targets.f_reshape([-1, 4])?,
            )?
            .f_view([b, n])?
            .f_where_self(pos, &no_centre)?
        } else {
            no_centre
        };
        Ok(HeadTargets {
            labels,
            label_weights,
            bbox_targets,
            bbox_weights,
            avg_factor,
            inside,
            anchors: anchors_out,
            centerness,
            assign,
            sampling,
            num_level_anchors: num_level_anchors.to_vec(),
        })
    }
}

/// The start of the point and alignment heads' targets: the sizes checked, and the inside flags
/// of the priors `(B, N)`. Returns `(B, N, inside)`.
fn checked_inside(
    who: &str,
    priors: &Tensor,
    num_level: &[i64],
    valid: &Tensor,
    metas: &[ImageMeta],
    gts: &GtBatch,
    allowed_border: f64,
) -> Result<(i64, i64, Tensor)> {
    let (b, _) = gts.dims()?;
    let n = priors.size().first().copied().unwrap_or(-1);
    ensure!(
        priors.dim() == 2 && priors.size()[1] == 4,
        "{who} targets: priors must be (N, 4), got {:?}",
        priors.size()
    );
    ensure!(
        metas.len() as i64 == b && valid.size() == [b, n],
        "{who} targets: {} image metas and valid flags {:?} for {b} images of {n} priors",
        metas.len(),
        valid.size()
    );
    ensure!(
        num_level.iter().sum::<i64>() == n,
        "{who} targets: level counts {num_level:?} for {n} priors"
    );
    Ok((b, n, inside_flags(priors, valid, metas, allowed_border)?))
}

/// What a `PseudoSampler` makes of an assignment: the positives, their labels (`num_classes`
/// elsewhere), label weights (`pos_weight` or 1 at positives, 1 at the other inside priors, 0
/// outside) and box targets (the ground-truth boxes at positives, 0 elsewhere, in `kind`).
struct Sampled {
    pos: Tensor,
    labels: Tensor,
    label_weights: Tensor,
    bbox_targets: Tensor,
}

fn sampled_targets(
    r: &AssignResult,
    inside: &Tensor,
    gts: &GtBatch,
    num_classes: i64,
    pos_weight: f64,
    kind: Kind,
) -> Result<Sampled> {
    let (b, n) = (r.gt_inds.size()[0], r.gt_inds.size()[1]);
    let dev = r.gt_inds.device();
    let pos = r.gt_inds.f_gt(0)?;
    let labels = r.labels.f_where_scalarother(&pos, num_classes)?;
    let pos_w = if pos_weight <= 0.0 { 1.0 } else { pos_weight };
    let label_weights = Tensor::f_ones([b, n], (Kind::Float, dev))?
        .f_where_scalarother(inside, 0.0)?
        .f_masked_fill(&pos, pos_w)?;
    let zeros = Tensor::f_zeros([b, n, 4], (kind, dev))?;
    let bbox_targets = if gts.bboxes.size()[1] == 0 {
        zeros
    } else {
        let idx = (&r.gt_inds - 1).f_clamp_min(0)?;
        let boxes = gts.bboxes.f_to_kind(kind)?.f_gather(
            1,
            &idx.unsqueeze(-1).f_expand([b, n, 4], false)?,
            false,
        )?;
        boxes.f_where_self(&pos.unsqueeze(-1), &zeros)?
    };
    Ok(Sampled {
        pos,
        labels,
        label_weights,
        bbox_targets,
    })
}

/// `anchor_inside_flags` for a batch: `(B, N)`, each image against its own `img_shape`.
pub fn inside_flags(
    anchors: &Tensor,
    valid_flags: &Tensor,
    metas: &[ImageMeta],
    allowed_border: f64,
) -> Result<Tensor> {
    let valid = valid_flags.f_to_kind(Kind::Bool)?;
    if allowed_border < 0.0 {
        return Ok(valid);
    }
    let dev = anchors.device();
    let hw: Vec<f64> = metas
        .iter()
        .flat_map(|m| [m.img_shape.0 as f64, m.img_shape.1 as f64])
        .collect();
    let hw = crate::task_modules::device_values(&hw, Kind::Double, dev)?.f_view([-1, 2])?;
    let (h, w) = (
        (hw.select(1, 0) + allowed_border).unsqueeze(1),
        (hw.select(1, 1) + allowed_border).unsqueeze(1),
    );
    let col = |j: i64| anchors.select(1, j).unsqueeze(0);
    Ok(valid
        .f_logical_and(&col(0).f_ge(-allowed_border)?)?
        .f_logical_and(&col(1).f_ge(-allowed_border)?)?
        .f_logical_and(&col(2).f_lt_tensor(&w)?)?
        .f_logical_and(&col(3).f_lt_tensor(&h)?)?)
}

/// `ATSSHead.centerness_target`: for anchors `(N, 4)` and their gt boxes `(N, 4)`,
/// `sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))` with l, t, r, b the distances from the
/// anchor's centre to the box's sides. MMDetection asserts that no value is NaN (positives
/// only); here a NaN comes back as NaN.
pub fn centerness_target(anchors: &Tensor, gts: &Tensor) -> Result<Tensor> {
    ensure!(
        anchors.size() == gts.size() && anchors.dim() == 2 && anchors.size()[1] == 4,
        "centerness_target: anchors {:?} and gts {:?} must both be (N, 4)",
        anchors.size(),
        gts.size()
    );
    // The anchor centre's distances to the box's sides, then FCOS's formula.
    let c = centres(anchors);
    let (cx, cy, g) = (c.select(1, 0), c.select(1, 1), |j: i64| gts.select(1, j));
    let sides = Tensor::f_stack(&[&cx - g(0), &cy - g(1), g(2) - &cx, g(3) - &cy], 1)?;
    fcos::centerness_target(&sides)
}
