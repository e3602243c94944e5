//! mmdet/models/losses/ddq_detr_aux_loss.py: [`DDQAuxLoss`], DDQ-DETR's loss of the dense
//! queries' auxiliary branch.

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use tch::{Kind, Tensor};

use super::{sum_in_order, sum_times_zero};
use crate::task_modules::{check_image, TopkHungarianAssigner};
use crate::{registry, Loss, LossArgs, Target};

pub(crate) const NAME: &str = "DDQAuxLoss";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_loss_cls")]
    loss_cls: Value,
    #[serde(default = "default_loss_bbox")]
    loss_bbox: Value,
    #[serde(default = "default_train_cfg")]
    train_cfg: Value,
}

fn default_loss_cls() -> Value {
    json!({"type": "QualityFocalLoss", "use_sigmoid": true, "activated": true, "beta": 2.0, "loss_weight": 1.0})
}

fn default_loss_bbox() -> Value {
    json!({"type": "GIoULoss", "loss_weight": 2.0})
}

fn default_train_cfg() -> Value {
    json!({"assigner": {"type": "TopkHungarianAssigner", "topk": 8}, "alpha": 1, "beta": 6})
}

/// MMDetection's `DDQAuxLoss`: the dense queries of DDQ-DETR are matched to the ground truths by
/// a [`TopkHungarianAssigner`] (each ground truth to `topk` queries), and each image's loss is
/// `loss_cls` (QualityFocalLoss on probabilities, against each positive's normalised alignment
/// metric) and `loss_bbox` (GIoULoss over the positives, weighted by the same metrics), each
/// divided by its sum over the batch (at least 1; averaged over the default `dist` group, as
/// `reduce_mean`).
///
/// As in MMDetection, it is not in the loss registry (`registry::build` of
/// `{"type": "DDQAuxLoss"}` is an error naming the registered types): a head builds it
/// directly, [`DDQAuxLoss::from_config`]. Its quirks are MMDetection's: the train_cfg's `alpha`
/// and `beta` are not passed to the assigner (1 and 6 always apply); the focal cost applies a
/// sigmoid to the scores, which are already probabilities; an image without ground truths has
/// label weights of 0 and so a classification loss of 0. MMDetection's float32
/// `norm_alignment_metrics` buffer takes float32 inputs only (float64 raises there), and so does
/// this.
///
/// The matching runs on the host (scipy's algorithm, one image at a time), so the loss reads
/// the device back; the normalisation by the batch sums does not.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use tch_detloss::losses::DDQAuxLoss;
/// let loss = DDQAuxLoss::from_config(&serde_json::json!({"type": "DDQAuxLoss"}))?;
/// let scores = Tensor::rand([1, 16, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let xy = Tensor::rand([1, 16, 2], (Kind::Float, Device::Cpu)) * 40.0;
/// let boxes = Tensor::cat(&[&xy, &(&xy + 20.0)], 2).detach().set_requires_grad(true);
/// let gt = Tensor::from_slice(&[5.0f32, 5.0, 30.0, 40.0]).view([1, 4]);
/// let out = loss.loss(&scores, &boxes, &[gt], &[Tensor::from_slice(&[2i64])], &[(80, 96)])?;
/// (&out.aux_loss_cls[0] + &out.aux_loss_bbox[0]).backward();
/// # anyhow::Ok(())
/// ```
#[derive(Debug)]
pub struct DDQAuxLoss {
    /// The classification loss (a QualityFocalLoss on probabilities by default).
    pub loss_cls: Box<dyn Loss>,
    /// The box loss (GIoULoss, loss_weight 2, by default).
    pub loss_bbox: Box<dyn Loss>,
    /// The assigner of `train_cfg['assigner']`.
    pub assigner: TopkHungarianAssigner,
}

/// [`DDQAuxLoss::loss`]'s result: MMDetection's dict of per-image lists.
#[derive(Debug)]
pub struct DDQAuxLosses {
    /// Each image's classification loss.
    pub aux_loss_cls: Vec<Tensor>,
    /// Each image's box loss.
    pub aux_loss_bbox: Vec<Tensor>,
}

/// One image's targets, as MMDetection's `_get_target_single` returns them.
#[derive(Debug)]
pub struct DDQAuxTargets {
    /// `(Q,)` int64: the matched class, `C` (background) elsewhere.
    pub labels: Tensor,
    /// `(Q,)` float32: 1 for every query of an image with ground truths, 0 otherwise.
    pub label_weights: Tensor,
    /// `(Q, 4)`: the matched ground-truth box, 0 elsewhere.
    pub bbox_targets: Tensor,
    /// `(Q,)` float32: per ground truth, the metrics of its queries over their largest
    /// (plus 1e-7), times their largest IoU; 0 for negatives.
    pub alignment_metrics: Tensor,
}

impl DDQAuxLoss {
    /// From its config dict: `loss_cls`, `loss_bbox` (any registered loss configs) and
    /// `train_cfg` (whose `assigner` is used; MMDetection reads nothing else of it).
    pub fn from_config(config: &Value) -> Result<Self> {
        if let Some(t) = config.get("type") {
            ensure!(
                t.as_str() == Some(NAME),
                "{NAME}: a config of type {t} is not a {NAME}"
            );
        }
        let c: Config = registry::parse_config(config)?;
        let assigner = c
            .train_cfg
            .get("assigner")
            .with_context(|| format!("{NAME}: train_cfg has no assigner"))?;
        ensure!(
            assigner.get("type").and_then(Value::as_str) == Some("TopkHungarianAssigner"),
            "{NAME}: only a TopkHungarianAssigner is supported, got {assigner}"
        );
        Ok(Self {
            loss_cls: registry::build(&c.loss_cls).with_context(|| format!("{NAME} loss_cls"))?,
            loss_bbox: registry::build(&c.loss_bbox)
                .with_context(|| format!("{NAME} loss_bbox"))?,
            assigner: TopkHungarianAssigner::from_config(assigner)
                .with_context(|| format!("{NAME} assigner"))?,
        })
    }

    /// MMDetection's `loss(cls_scores, bbox_preds, gt_bboxes, gt_labels, img_metas)`: scores
    /// `(B, Q, C)` (probabilities), boxes `(B, Q, 4)` in xyxy pixels, per image the ground
    /// truths `(G, 4)` and classes `(G,)`, and the image's `img_shape` `(height, width)`.
    pub fn loss(
        &self,
        cls_scores: &Tensor,
        bbox_preds: &Tensor,
        gt_bboxes: &[Tensor],
        gt_labels: &[Tensor],
        img_shapes: &[(i64, i64)],
    ) -> Result<DDQAuxLosses> {
        self.loss_with(
            cls_scores, bbox_preds, gt_bboxes, gt_labels, img_shapes, false,
        )
    }

    /// [`DDQAuxLoss::loss`] with the stock-op compositions of its two losses
    /// ([`Loss::forward_unfused`]): its reference, and the profile's unfused side.
    pub fn loss_unfused(
        &self,
        cls_scores: &Tensor,
        bbox_preds: &Tensor,
        gt_bboxes: &[Tensor],
        gt_labels: &[Tensor],
        img_shapes: &[(i64, i64)],
    ) -> Result<DDQAuxLosses> {
        self.loss_with(
            cls_scores, bbox_preds, gt_bboxes, gt_labels, img_shapes, true,
        )
    }

    fn loss_with(
        &self,
        cls_scores: &Tensor,
        bbox_preds: &Tensor,
        gt_bboxes: &[Tensor],
        gt_labels: &[Tensor],
        img_shapes: &[(i64, i64)],
        unfused: bool,
    ) -> Result<DDQAuxLosses> {
        let targets = self.get_targets(cls_scores, bbox_preds, gt_bboxes, gt_labels, img_shapes)?;
        let (mut cls, mut bbox, mut cls_terms, mut bbox_terms) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, t) in targets.iter().enumerate() {
            let (c, b, cf, bf) = self
                .loss_single(
                    &cls_scores.f_select(0, i as i64)?,
                    &bbox_preds.f_select(0, i as i64)?,
                    t,
                    unfused,
                )
                .with_context(|| format!("{NAME}: image {i}"))?;
            cls.push(c);
            bbox.push(b);
            cls_terms.push(cf);
            bbox_terms.push(bf);
        }
        let (cls_sum, bbox_sum) = (sum_in_order(cls_terms)?, sum_in_order(bbox_terms)?);
        // `reduce_mean(sum(...)).clamp_(min=1)`, kept on the device (MMDetection's `.item()`
        // reads it back; dividing by the 0-dim tensor gives the same float32 quotient).
        let divisor = |s: Option<Tensor>| -> Result<Option<Tensor>> {
            s.map(|s| Ok(crate::dist::reduce_mean(&s)?.f_clamp_min(1.0)?))
                .transpose()
        };
        let (cls_div, bbox_div) = (divisor(cls_sum)?, divisor(bbox_sum)?);
        let div = |v: Vec<Tensor>, d: &Option<Tensor>| -> Result<Vec<Tensor>> {
            v.into_iter()
                .map(|l| match d {
                    Some(d) => Ok(l.f_div(d)?),
                    None => Ok(l),
                })
                .collect()
        };
        Ok(DDQAuxLosses {
            aux_loss_cls: div(cls, &cls_div)?,
            aux_loss_bbox: div(bbox, &bbox_div)?,
        })
    }

    /// MMDetection's `get_targets`: each image's [`DDQAuxTargets`].
    pub fn get_targets(
        &self,
        cls_scores: &Tensor,
        bbox_preds: &Tensor,
        gt_bboxes: &[Tensor],
        gt_labels: &[Tensor],
        img_shapes: &[(i64, i64)],
    ) -> Result<Vec<DDQAuxTargets>> {
        crate::checks::floating(NAME, "cls_scores", cls_scores)?;
        crate::checks::floating(NAME, "bbox_preds", bbox_preds)?;
        let s = cls_scores.size();
        ensure!(
            s.len() == 3 && bbox_preds.size() == [s[0], s[1], 4],
            "{NAME}: cls_scores must be (B, Q, C) and bbox_preds (B, Q, 4), got {s:?} and {:?}",
            bbox_preds.size()
        );
        for (what, t) in [("cls_scores", cls_scores), ("bbox_preds", bbox_preds)] {
            if t.kind() != Kind::Float {
                bail!(
                    "{NAME}: {what} must be float32, got {:?}: MMDetection's float32 norm_alignment_metrics buffer takes no other dtype (Index put requires the source and destination dtypes match, got Float for the destination and {:?} for the source.)",
                    t.kind(),
                    t.kind()
                );
            }
        }
        let b = s[0] as usize;
        ensure!(
            gt_bboxes.len() == b && gt_labels.len() == b && img_shapes.len() == b,
            "{NAME}: {b} images, but {} gt_bboxes, {} gt_labels and {} img_shapes",
            gt_bboxes.len(),
            gt_labels.len(),
            img_shapes.len()
        );
        (0..b)
            .map(|i| {
                self.target_single(
                    &cls_scores.f_select(0, i as i64)?,
                    &bbox_preds.f_select(0, i as i64)?,
                    &gt_bboxes[i],
                    &gt_labels[i],
                    img_shapes[i],
                )
                .with_context(|| format!("{NAME}: image {i}"))
            })
            .collect()
    }

    /// `_get_target_single`.
    fn target_single(
        &self,
        scores: &Tensor,
        boxes: &Tensor,
        gt_bboxes: &Tensor,
        gt_labels: &Tensor,
        img_shape: (i64, i64),
    ) -> Result<DDQAuxTargets> {
        let c = check_image(NAME, scores, boxes, gt_bboxes, gt_labels)?;
        let (q, dev) = (scores.size()[0], scores.device());
        let float = (Kind::Float, dev);
        let bbox_targets = boxes.f_detach()?.f_zeros_like()?;
        let labels = Tensor::f_full([q], c, (Kind::Int64, dev))?;
        if gt_labels.size()[0] == 0 {
            return Ok(DDQAuxTargets {
                labels,
                label_weights: Tensor::f_zeros([q], float)?,
                bbox_targets,
                alignment_metrics: Tensor::f_zeros([q], float)?,
            });
        }
        // The train_cfg's alpha and beta are not passed (MMDetection's call takes the defaults).
        let r = self
            .assigner
            .assign(scores, boxes, gt_bboxes, gt_labels, img_shape, 1.0, 6.0)?;
        // PseudoSampler: the positives in query order, which is the order of the assigner's
        // per-match results.
        let pos = r.gt_inds.f_gt(0)?.f_nonzero()?.f_view([-1])?;
        let pos_gt = r.gt_inds.f_index_select(0, &pos)?.f_sub_scalar(1)?;
        let bbox_targets = bbox_targets.f_index_put(
            &[Some(&pos)],
            &gt_bboxes.f_index_select(0, &pos_gt)?,
            false,
        )?;
        let labels =
            labels.f_index_put(&[Some(&pos)], &gt_labels.f_index_select(0, &pos_gt)?, false)?;
        // Every query is a positive or a negative.
        let label_weights = Tensor::f_ones([q], float)?;
        // Per ground truth: its metrics over their largest (plus 10e-8), times its largest IoU.
        let g = gt_labels.size()[0];
        let per_gt_max = |v: &Tensor| -> Result<Tensor> {
            Ok(Tensor::f_zeros([g], (v.kind(), dev))?
                .f_internal_scatter_reduce(0, &pos_gt, v, "amax", false)?
                .f_index_select(0, &pos_gt)?)
        };
        let norm = r
            .assign_metrics
            .f_div(&per_gt_max(&r.assign_metrics)?.f_add_scalar(10e-8)?)?
            .f_mul(&per_gt_max(&r.max_overlaps)?)?;
        let alignment_metrics =
            Tensor::f_zeros([q], float)?.f_index_put(&[Some(&pos)], &norm, false)?;
        Ok(DDQAuxTargets {
            labels,
            label_weights,
            bbox_targets,
            alignment_metrics,
        })
    }

    /// `loss_single`: one image's cls and bbox losses and their avg_factor terms.
    fn loss_single(
        &self,
        scores: &Tensor,
        boxes: &Tensor,
        t: &DDQAuxTargets,
        unfused: bool,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let call = |l: &dyn Loss, p: &Tensor, target: Target<'_>, args: &LossArgs<'_>| {
            if unfused {
                l.forward_unfused(p, target, args)
            } else {
                l.forward(p, target, args)
            }
        };
        let cls = call(
            self.loss_cls.as_ref(),
            scores,
            Target::LabelsScores {
                labels: &t.labels,
                scores: &t.alignment_metrics,
            },
            &LossArgs::new().weight(&t.label_weights).avg_factor(1.0),
        )?;
        let c = scores.size()[1];
        let pos = t
            .labels
            .f_ge(0)?
            .f_logical_and(&t.labels.f_lt(c)?)?
            .f_nonzero()?
            .f_view([-1])?;
        let (bbox, pos_weight) = if pos.size()[0] > 0 {
            let w = t.alignment_metrics.f_index_select(0, &pos)?;
            let l = call(
                self.loss_bbox.as_ref(),
                &boxes.f_index_select(0, &pos)?,
                Target::Tensor(&t.bbox_targets.f_index_select(0, &pos)?),
                &LossArgs::new().weight(&w).avg_factor(1.0),
            )?;
            (l, w)
        } else {
            (
                sum_times_zero(boxes)?,
                Tensor::f_zeros([], (t.bbox_targets.kind(), t.bbox_targets.device()))?,
            )
        };
        Ok((
            cls,
            bbox,
            t.alignment_metrics.f_sum(None::<Kind>)?,
            pos_weight.f_sum(None::<Kind>)?,
        ))
    }
}
