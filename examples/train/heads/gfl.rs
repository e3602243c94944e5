//! `GFLHead`: ATSSHead's towers, a class convolution and a general-distribution box branch of
//! `4 × (reg_max + 1)` logits with a `Scale` per level; ATSS assignment, QualityFocalLoss on
//! `(labels, IoU of the decoded prediction)`, GIoULoss and DistributionFocalLoss weighted by
//! the largest class probability, decoded through the `Integral`.

use anyhow::Result;
use serde_json::{json, Value};
use tch::{nn, Tensor};
use tch_detloss::dense_heads::{GFLHeadTargets, ImageMeta};
use tch_detloss::task_modules::{distance2bbox, GtBatch, MaxShape};
use tch_detloss::{registry, Loss, LossArgs};

use super::atss::Towers;
use super::{call, divisor, flat, prior_strides, Head, Outputs, Setup, Targets};
use crate::model::{conv, prior_bias, scales, STRIDES, WIDTH};

const REG_MAX: i64 = 16;

/// MMDetection's `gfl_r50_fpn_1x_coco.py` head, its anchors at 4 × stride for the small images.
fn config(classes: i64) -> Value {
    json!({
        "type": "GFLHead", "num_classes": classes, "reg_max": REG_MAX,
        "anchor_generator": {"type": "AnchorGenerator", "ratios": [1.0], "octave_base_scale": 4,
                             "scales_per_octave": 1, "strides": STRIDES},
        "loss_cls": {"type": "QualityFocalLoss", "use_sigmoid": true, "beta": 2.0, "loss_weight": 1.0},
        "loss_dfl": {"type": "DistributionFocalLoss", "loss_weight": 0.25},
        "loss_bbox": {"type": "GIoULoss", "loss_weight": 2.0},
        "train_cfg": {"assigner": {"type": "ATSSAssigner", "topk": 9}, "allowed_border": -1, "pos_weight": -1}
    })
}

pub struct Gfl {
    towers: Towers,
    gfl_cls: nn::Conv2D,
    gfl_reg: nn::Conv2D,
    scales: Vec<Tensor>,
    head: GFLHeadTargets,
    loss_cls: Box<dyn Loss>,
    loss_bbox: Box<dyn Loss>,
    loss_dfl: Box<dyn Loss>,
    anchors: Tensor,
    strides: Tensor,
    counts: Vec<i64>,
    valid: Tensor,
    metas: Vec<ImageMeta>,
    size: i64,
}

impl Gfl {
    pub fn new(vs: &nn::Path, classes: i64, setup: &Setup) -> Result<Self> {
        let cfg = config(classes);
        let head = GFLHeadTargets::from_config(&cfg)?;
        let metas = setup.metas();
        let (anchors, valid, counts) =
            head.targets
                .anchors(&setup.featmaps(), &metas, setup.device)?;
        Ok(Self {
            towers: Towers::new(vs),
            gfl_cls: conv(vs / "gfl_cls", WIDTH, classes, 3, Some(0.01), prior_bias()),
            gfl_reg: conv(vs / "gfl_reg", WIDTH, 4 * (REG_MAX + 1), 3, Some(0.01), 0.0),
            scales: scales(vs / "scales", STRIDES.len()),
            loss_cls: registry::build(&cfg["loss_cls"])?,
            loss_bbox: registry::build(&cfg["loss_bbox"])?,
            loss_dfl: registry::build(&cfg["loss_dfl"])?,
            strides: prior_strides(&counts, setup.device),
            head,
            anchors,
            counts,
            valid,
            metas,
            size: setup.size,
        })
    }
}

impl Head for Gfl {
    fn loss_names(&self) -> &'static [&'static str] {
        &["loss_cls", "loss_bbox", "loss_dfl"]
    }

    fn num_priors(&self) -> i64 {
        self.anchors.size()[0]
    }

    /// Class logits and the distribution logits `(B, N, 4 × 17)`.
    fn forward_t(&self, feats: &[Tensor], _train: bool) -> Outputs {
        let (mut cls, mut reg) = (Vec::new(), Vec::new());
        for (p, scale) in feats.iter().zip(&self.scales) {
            let (c, r) = self.towers.forward(p);
            cls.push(c.apply(&self.gfl_cls));
            reg.push(r.apply(&self.gfl_reg) * scale);
        }
        Outputs {
            cls: flat(&cls),
            reg: flat(&reg),
            ctr: None,
        }
    }

    fn targets(&self, _out: &Outputs, gts: &GtBatch, _step: i64) -> Result<Targets> {
        let t = self.head.targets.targets_for(
            &self.anchors,
            &self.counts,
            &self.valid,
            &self.metas,
            gts,
            None,
        )?;
        Ok(Targets::Anchor(t))
    }

    /// GFLHead.loss_by_feat: QFL over all anchors divided by the positives; GIoU and DFL
    /// (`avg_factor` 1 and 4) divided by the sum of the weights.
    fn losses(&self, out: &Outputs, t: &Targets, fused: bool) -> Result<Vec<Tensor>> {
        let Targets::Anchor(t) = t else {
            anyhow::bail!("GFLHead: anchor targets expected");
        };
        let c = out.cls.size()[2];
        let inputs = self.head.loss_inputs(t, &out.cls, &out.reg)?;
        let avg_factor = divisor(&t.avg_factor)?;
        let labels = t.labels.reshape([-1]);
        let scores = inputs.scores.reshape([-1]);
        let loss_cls = call(
            &*self.loss_cls,
            fused,
            &out.cls.reshape([-1, c]),
            (&labels, &scores).into(),
            &LossArgs::new()
                .weight(&t.label_weights.reshape([-1]))
                .avg_factor(&avg_factor),
        )?;
        let bbox_avg = inputs.bbox_avg_factor()?;
        let weights = inputs.weights.reshape([-1]);
        let loss_bbox = call(
            &*self.loss_bbox,
            fused,
            &inputs.pred_boxes.reshape([-1, 4]),
            (&inputs.target_boxes.reshape([-1, 4])).into(),
            &LossArgs::new().weight(&weights).avg_factor(1.0),
        )? / &bbox_avg;
        let side_weights = weights.unsqueeze(-1).expand([-1, 4], false).reshape([-1]);
        let loss_dfl = call(
            &*self.loss_dfl,
            fused,
            &inputs.corner_logits.reshape([-1, REG_MAX + 1]),
            (&inputs.corner_targets.reshape([-1])).into(),
            &LossArgs::new().weight(&side_weights).avg_factor(4.0),
        )? / &bbox_avg;
        Ok(vec![loss_cls, loss_bbox, loss_dfl])
    }

    /// sigmoid(class); the integral's distances times the stride from the anchor centres.
    fn predict(&self, out: &Outputs) -> Result<(Tensor, Tensor)> {
        let b = out.cls.size()[0];
        let dist = self.head.integral(&out.reg)? * &self.strides;
        let a = &self.anchors;
        let centres = Tensor::stack(
            &[
                (a.select(1, 0) + a.select(1, 2)) / 2.0,
                (a.select(1, 1) + a.select(1, 3)) / 2.0,
            ],
            -1,
        )
        .unsqueeze(0)
        .expand([b, -1, 2], false);
        let boxes = distance2bbox(&centres, &dist, Some(MaxShape::Image(self.size, self.size)))?;
        Ok((out.cls.sigmoid(), boxes))
    }
}
