//! `FCOSHead` as MMDetection's improved config (`fcos_r50-caffe_fpn_gn-head-center-normbbox-
//! centeronreg-giou_1x_coco.py`): GroupNorm towers, centre sampling, `norm_on_bbox` (distances
//! in strides, `relu` instead of `exp`), centerness on the regression branch, a `Scale` per
//! level; FocalLoss, GIoULoss weighted by the centerness targets, sigmoid CrossEntropyLoss for
//! centerness.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tch::{nn, Kind, Tensor};
use tch_detloss::dense_heads::FCOSHeadTargets;
use tch_detloss::task_modules::GtBatch;
use tch_detloss::{registry, Loss, LossArgs};

use super::atss::Towers;
use super::{call, flat, prior_strides, Head, Outputs, Setup, Targets};
use crate::model::{conv, prior_bias, scales, STRIDES, WIDTH};

/// The head's config; the regress ranges, (-1, 64), (64, 128), ... for 800-pixel images in
/// MMDetection, scaled to the example's 128-pixel images and 14 to 60 pixel objects.
fn config(classes: i64) -> Value {
    json!({
        "type": "FCOSHead", "num_classes": classes, "strides": STRIDES,
        "regress_ranges": [[-1, 16], [16, 32], [32, 100000000]],
        "norm_on_bbox": true, "centerness_on_reg": true, "center_sampling": true,
        "center_sample_radius": 1.5,
        "loss_cls": {"type": "FocalLoss", "use_sigmoid": true, "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0},
        "loss_bbox": {"type": "GIoULoss", "loss_weight": 1.0},
        "loss_centerness": {"type": "CrossEntropyLoss", "use_sigmoid": true, "loss_weight": 1.0}
    })
}

pub struct Fcos {
    towers: Towers,
    conv_cls: nn::Conv2D,
    conv_reg: nn::Conv2D,
    conv_centerness: nn::Conv2D,
    scales: Vec<Tensor>,
    head: FCOSHeadTargets,
    loss_cls: Box<dyn Loss>,
    loss_bbox: Box<dyn Loss>,
    loss_ctr: Box<dyn Loss>,
    points: Tensor,
    strides: Tensor,
    counts: Vec<i64>,
    size: i64,
}

impl Fcos {
    pub fn new(vs: &nn::Path, classes: i64, setup: &Setup) -> Result<Self> {
        let cfg = config(classes);
        let head = FCOSHeadTargets::from_config(&cfg)?;
        let (points, counts) = head.points(&setup.featmaps(), Kind::Float, setup.device)?;
        Ok(Self {
            towers: Towers::new(vs),
            conv_cls: conv(vs / "conv_cls", WIDTH, classes, 3, Some(0.01), prior_bias()),
            conv_reg: conv(vs / "conv_reg", WIDTH, 4, 3, Some(0.01), 0.0),
            conv_centerness: conv(vs / "conv_centerness", WIDTH, 1, 3, Some(0.01), 0.0),
            scales: scales(vs / "scales", STRIDES.len()),
            loss_cls: registry::build(&cfg["loss_cls"])?,
            loss_bbox: registry::build(&cfg["loss_bbox"])?,
            loss_ctr: registry::build(&cfg["loss_centerness"])?,
            strides: prior_strides(&counts, setup.device),
            head,
            points,
            counts,
            size: setup.size,
        })
    }
}

impl Head for Fcos {
    fn loss_names(&self) -> &'static [&'static str] {
        &["loss_cls", "loss_bbox", "loss_centerness"]
    }

    fn num_priors(&self) -> i64 {
        self.points.size()[0]
    }

    /// Class logits, distances in strides `(B, N, 4)` (`relu` of the scaled output, as
    /// `norm_on_bbox` trains) and centerness logits.
    fn forward_t(&self, feats: &[Tensor], _train: bool) -> Outputs {
        let (mut cls, mut reg, mut ctr) = (Vec::new(), Vec::new(), Vec::new());
        for (p, scale) in feats.iter().zip(&self.scales) {
            let (c, r) = self.towers.forward(p);
            cls.push(c.apply(&self.conv_cls));
            reg.push((r.apply(&self.conv_reg) * scale).relu());
            ctr.push(r.apply(&self.conv_centerness));
        }
        Outputs {
            cls: flat(&cls),
            reg: flat(&reg),
            ctr: Some(flat(&ctr).squeeze_dim(-1)),
        }
    }

    fn targets(&self, _out: &Outputs, gts: &GtBatch, _step: i64) -> Result<Targets> {
        Ok(Targets::Fcos(self.head.targets(
            &self.points,
            &self.counts,
            gts,
        )?))
    }

    /// FCOSHead.loss_by_feat: Focal over all points and centerness CE over the positives,
    /// divided by the positives; GIoU of the boxes decoded from the points (pixels) and the
    /// normalised distances (MMDetection's quirk with `norm_on_bbox`), weighted by and divided
    /// by the centerness targets.
    fn losses(&self, out: &Outputs, t: &Targets, fused: bool) -> Result<Vec<Tensor>> {
        let Targets::Fcos(t) = t else {
            anyhow::bail!("FCOSHead: FCOS targets expected");
        };
        let c = out.cls.size()[2];
        let (num_pos, ctr_denorm) = t.avg_factors()?;
        let labels = t.labels.reshape([-1]);
        let loss_cls = call(
            &*self.loss_cls,
            fused,
            &out.cls.reshape([-1, c]),
            (&labels).into(),
            &LossArgs::new().avg_factor(&num_pos),
        )?;
        let pred = self.head.decode(&self.points, &out.reg)?.reshape([-1, 4]);
        let target = self
            .head
            .decode(&self.points, &t.bbox_targets)?
            .reshape([-1, 4]);
        let ctr_t = t.centerness.reshape([-1]);
        let loss_bbox = call(
            &*self.loss_bbox,
            fused,
            &pred,
            (&target).into(),
            &LossArgs::new().weight(&ctr_t).avg_factor(&ctr_denorm),
        )?;
        let ctr = out
            .ctr
            .as_ref()
            .context("FCOSHead: no centerness")?
            .reshape([-1]);
        let pos_w = t.pos_mask.reshape([-1]).to_kind(Kind::Float);
        let loss_ctr = call(
            &*self.loss_ctr,
            fused,
            &ctr,
            (&ctr_t).into(),
            &LossArgs::new().weight(&pos_w).avg_factor(&num_pos),
        )?;
        Ok(vec![loss_cls, loss_bbox, loss_ctr])
    }

    /// sigmoid(class) × sigmoid(centerness); the distances times the stride from the points,
    /// clipped to the image.
    fn predict(&self, out: &Outputs) -> Result<(Tensor, Tensor)> {
        let ctr = out.ctr.as_ref().context("FCOSHead: no centerness")?;
        let scores = out.cls.sigmoid() * ctr.sigmoid().unsqueeze(-1);
        let boxes = self
            .head
            .decode(&self.points, &(&out.reg * &self.strides))?
            .clamp(0.0, self.size as f64);
        Ok((scores, boxes))
    }
}
