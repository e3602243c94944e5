//! `ATSSHead`: shared classification and regression towers with GroupNorm, the class, box-delta
//! and centerness convolutions, a `Scale` per level; ATSS assignment, FocalLoss, GIoULoss on
//! the decoded deltas weighted by the centerness targets, sigmoid CrossEntropyLoss for
//! centerness.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tch::{nn, Kind, Tensor};
use tch_detloss::dense_heads::{DenseHeadTargets, ImageMeta};
use tch_detloss::task_modules::{GtBatch, MaxShape};
use tch_detloss::{registry, Loss, LossArgs};

use super::{call, divisor, flat, Head, Outputs, Setup, Targets};
use crate::model::{conv, prior_bias, scales, ConvGn, STRIDES, WIDTH};

/// The head's config as an MMDetection user writes it (the layer keys are the model's business);
/// anchors of 4 × stride for the example's small images.
fn config(classes: i64) -> Value {
    json!({
        "type": "ATSSHead", "num_classes": classes,
        "anchor_generator": {"type": "AnchorGenerator", "ratios": [1.0], "octave_base_scale": 4,
                             "scales_per_octave": 1, "strides": STRIDES},
        "bbox_coder": {"type": "DeltaXYWHBBoxCoder", "target_means": [0.0, 0.0, 0.0, 0.0],
                       "target_stds": [0.1, 0.1, 0.2, 0.2]},
        "loss_cls": {"type": "FocalLoss", "use_sigmoid": true, "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0},
        "loss_bbox": {"type": "GIoULoss", "loss_weight": 2.0},
        "loss_centerness": {"type": "CrossEntropyLoss", "use_sigmoid": true, "loss_weight": 1.0},
        "train_cfg": {"assigner": {"type": "ATSSAssigner", "topk": 9}, "allowed_border": -1, "pos_weight": -1}
    })
}

/// The shared towers (2 convs each, normal(0, 0.01)) and the three output convolutions.
pub(super) struct Towers {
    cls: Vec<ConvGn>,
    reg: Vec<ConvGn>,
}

impl Towers {
    pub(super) fn new(vs: &nn::Path) -> Self {
        let tower = |name: &str| {
            (0..2)
                .map(|i| ConvGn::new(vs / format!("{name}{i}"), WIDTH, WIDTH, 3, 1, Some(0.01)))
                .collect()
        };
        Self {
            cls: tower("cls_convs"),
            reg: tower("reg_convs"),
        }
    }
    /// The classification and regression features of one level.
    pub(super) fn forward(&self, x: &Tensor) -> (Tensor, Tensor) {
        let run = |t: &[ConvGn]| t.iter().fold(x.shallow_clone(), |x, m| m.forward(&x));
        (run(&self.cls), run(&self.reg))
    }
}

pub struct Atss {
    towers: Towers,
    atss_cls: nn::Conv2D,
    atss_reg: nn::Conv2D,
    atss_ctr: nn::Conv2D,
    scales: Vec<Tensor>,
    targets: DenseHeadTargets,
    loss_cls: Box<dyn Loss>,
    loss_bbox: Box<dyn Loss>,
    loss_ctr: Box<dyn Loss>,
    anchors: Tensor,
    counts: Vec<i64>,
    valid: Tensor,
    metas: Vec<ImageMeta>,
    size: i64,
}

impl Atss {
    pub fn new(vs: &nn::Path, classes: i64, setup: &Setup) -> Result<Self> {
        let cfg = config(classes);
        let targets = DenseHeadTargets::from_config(&cfg)?;
        let metas = setup.metas();
        let (anchors, valid, counts) = targets.anchors(&setup.featmaps(), &metas, setup.device)?;
        Ok(Self {
            towers: Towers::new(vs),
            atss_cls: conv(vs / "atss_cls", WIDTH, classes, 3, Some(0.01), prior_bias()),
            atss_reg: conv(vs / "atss_reg", WIDTH, 4, 3, Some(0.01), 0.0),
            atss_ctr: conv(vs / "atss_centerness", WIDTH, 1, 3, Some(0.01), 0.0),
            scales: scales(vs / "scales", STRIDES.len()),
            loss_cls: registry::build(&cfg["loss_cls"])?,
            loss_bbox: registry::build(&cfg["loss_bbox"])?,
            loss_ctr: registry::build(&cfg["loss_centerness"])?,
            targets,
            anchors,
            counts,
            valid,
            metas,
            size: setup.size,
        })
    }
}

impl Head for Atss {
    fn loss_names(&self) -> &'static [&'static str] {
        &["loss_cls", "loss_bbox", "loss_centerness"]
    }

    fn num_priors(&self) -> i64 {
        self.anchors.size()[0]
    }

    /// Class logits, box deltas `(B, N, 4)` and centerness logits.
    fn forward_t(&self, feats: &[Tensor], _train: bool) -> Outputs {
        let (mut cls, mut reg, mut ctr) = (Vec::new(), Vec::new(), Vec::new());
        for (p, scale) in feats.iter().zip(&self.scales) {
            let (c, r) = self.towers.forward(p);
            cls.push(c.apply(&self.atss_cls));
            reg.push(r.apply(&self.atss_reg) * scale);
            ctr.push(r.apply(&self.atss_ctr));
        }
        Outputs {
            cls: flat(&cls),
            reg: flat(&reg),
            ctr: Some(flat(&ctr).squeeze_dim(-1)),
        }
    }

    fn targets(&self, _out: &Outputs, gts: &GtBatch, _step: i64) -> Result<Targets> {
        let t = self.targets.targets_for(
            &self.anchors,
            &self.counts,
            &self.valid,
            &self.metas,
            gts,
            None,
        )?;
        Ok(Targets::Anchor(t))
    }

    /// ATSSHead.loss_by_feat over all levels and images at once.
    fn losses(&self, out: &Outputs, t: &Targets, fused: bool) -> Result<Vec<Tensor>> {
        let Targets::Anchor(t) = t else {
            anyhow::bail!("ATSSHead: anchor targets expected");
        };
        let c = out.cls.size()[2];
        let cls = out.cls.reshape([-1, c]);
        let reg = out.reg.reshape([-1, 4]);
        let ctr = out
            .ctr
            .as_ref()
            .context("ATSSHead: no centerness")?
            .reshape([-1]);
        let labels = t.labels.reshape([-1]);
        let label_weights = t.label_weights.reshape([-1]);
        let anchors = t.anchors.reshape([-1, 4]);
        let targets = t.bbox_targets.reshape([-1, 4]);
        let ctr_t = t.centerness.reshape([-1]);
        let decoded = self.targets.bbox_coder.decode(&anchors, &reg, None)?;
        // As ATSSHead, both divisors are means over the ranks.
        let avg_factor = divisor(&t.avg_factor)?;
        let loss_cls = call(
            &*self.loss_cls,
            fused,
            &cls,
            (&labels).into(),
            &LossArgs::new()
                .weight(&label_weights)
                .avg_factor(&avg_factor),
        )?;
        // MMDetection divides the box loss by the centerness targets' sum, clamped at 1.
        let bbox_avg = divisor(&ctr_t.sum(Kind::Float))?;
        let loss_bbox = call(
            &*self.loss_bbox,
            fused,
            &decoded,
            (&targets).into(),
            &LossArgs::new().weight(&ctr_t).avg_factor(1.0),
        )? / bbox_avg;
        let pos_w = t.sampling.pos_mask.reshape([-1]).to_kind(Kind::Float);
        let loss_ctr = call(
            &*self.loss_ctr,
            fused,
            &ctr,
            (&ctr_t).into(),
            &LossArgs::new().weight(&pos_w).avg_factor(&avg_factor),
        )?;
        Ok(vec![loss_cls, loss_bbox, loss_ctr])
    }

    /// sigmoid(class) × sigmoid(centerness); the deltas decoded from the anchors, clipped.
    fn predict(&self, out: &Outputs) -> Result<(Tensor, Tensor)> {
        let b = out.cls.size()[0];
        let ctr = out.ctr.as_ref().context("ATSSHead: no centerness")?;
        let scores = out.cls.sigmoid() * ctr.sigmoid().unsqueeze(-1);
        let anchors = self.anchors.unsqueeze(0).expand([b, -1, 4], false);
        let boxes = self.targets.bbox_coder.decode(
            &anchors.reshape([-1, 4]),
            &out.reg.reshape([-1, 4]),
            Some(MaxShape::Image(self.size, self.size)),
        )?;
        Ok((scores, boxes.view([b, -1, 4])))
    }
}
