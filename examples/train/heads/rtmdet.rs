//! `RTMDetSepBNHead` as `rtmdet_l_8xb32-300e_coco.py` builds it: classification and regression
//! towers whose convolutions all levels share while each level keeps its own BatchNorm
//! (`share_conv`), SiLU, 1×1 prediction convolutions per level, `exp_on_reg`, distances times
//! the stride; DynamicSoftLabelAssigner, QualityFocalLoss on `(labels, IoU)` and GIoULoss
//! (weight 2), both weighted by the assigner's metrics.

use anyhow::Result;
use serde_json::{json, Value};
use tch::{nn, Tensor};
use tch_detloss::dense_heads::{ImageMeta, RTMDetHeadTargets};
use tch_detloss::task_modules::{distance2bbox, GtBatch, MaxShape};
use tch_detloss::{registry, Loss, LossArgs};

use super::{call, flat, Head, Outputs, Setup, Targets};
use crate::model::{conv, conv_no_bias, prior_bias, BnSilu, STRIDES, WIDTH};

fn config(classes: i64) -> Value {
    json!({
        "type": "RTMDetSepBNHead", "num_classes": classes,
        "anchor_generator": {"type": "MlvlPointGenerator", "offset": 0, "strides": STRIDES},
        "bbox_coder": {"type": "DistancePointBBoxCoder"},
        "loss_cls": {"type": "QualityFocalLoss", "use_sigmoid": true, "beta": 2.0, "loss_weight": 1.0},
        "loss_bbox": {"type": "GIoULoss", "loss_weight": 2.0},
        "exp_on_reg": true, "share_conv": true, "pred_kernel_size": 1,
        "train_cfg": {"assigner": {"type": "DynamicSoftLabelAssigner", "topk": 13},
                      "allowed_border": -1, "pos_weight": -1}
    })
}

/// One tower: the convolutions (shared by the levels) and each level's norm.
struct SepBnTower {
    convs: Vec<nn::Conv2D>,
    norms: Vec<Vec<BnSilu>>,
}

impl SepBnTower {
    fn new(vs: &nn::Path, name: &str) -> Self {
        let convs = (0..2)
            .map(|i| conv_no_bias(vs / format!("{name}0_{i}"), WIDTH, WIDTH, 3, 1, Some(0.01)))
            .collect();
        let norms = (0..STRIDES.len())
            .map(|l| {
                (0..2)
                    .map(|i| BnSilu::new(vs / format!("{name}{l}_{i}_bn"), WIDTH))
                    .collect()
            })
            .collect();
        Self { convs, norms }
    }
    fn forward_t(&self, level: usize, x: &Tensor, train: bool) -> Tensor {
        self.convs
            .iter()
            .zip(&self.norms[level])
            .fold(x.shallow_clone(), |x, (c, n)| n.forward_t(c, &x, train))
    }
}

pub struct Rtmdet {
    cls_convs: SepBnTower,
    reg_convs: SepBnTower,
    rtm_cls: Vec<nn::Conv2D>,
    rtm_reg: Vec<nn::Conv2D>,
    head: RTMDetHeadTargets,
    loss_cls: Box<dyn Loss>,
    loss_bbox: Box<dyn Loss>,
    priors: Tensor,
    counts: Vec<i64>,
    valid: Tensor,
    metas: Vec<ImageMeta>,
    size: i64,
}

impl Rtmdet {
    pub fn new(vs: &nn::Path, classes: i64, setup: &Setup) -> Result<Self> {
        let cfg = config(classes);
        let head = RTMDetHeadTargets::from_config(&cfg)?;
        let metas = setup.metas();
        let (priors, valid, counts) = head.priors(&setup.featmaps(), &metas, setup.device)?;
        let per_level = |name: &str, out: i64, bias: f64| {
            (0..STRIDES.len())
                .map(|l| conv(vs / format!("{name}{l}"), WIDTH, out, 1, Some(0.01), bias))
                .collect()
        };
        Ok(Self {
            cls_convs: SepBnTower::new(vs, "cls_convs"),
            reg_convs: SepBnTower::new(vs, "reg_convs"),
            rtm_cls: per_level("rtm_cls", classes, prior_bias()),
            rtm_reg: per_level("rtm_reg", 4, 0.0),
            loss_cls: registry::build(&cfg["loss_cls"])?,
            loss_bbox: registry::build(&cfg["loss_bbox"])?,
            head,
            priors,
            counts,
            valid,
            metas,
            size: setup.size,
        })
    }

    fn decoded(&self, out: &Outputs) -> Result<Tensor> {
        self.head.decode(&self.priors, &out.reg)
    }
}

impl Head for Rtmdet {
    fn loss_names(&self) -> &'static [&'static str] {
        &["loss_cls", "loss_bbox"]
    }

    fn num_priors(&self) -> i64 {
        self.priors.size()[0]
    }

    /// Class logits and distances in pixels `(B, N, 4)` (`exp` times the stride).
    fn forward_t(&self, feats: &[Tensor], train: bool) -> Outputs {
        let (mut cls, mut reg) = (Vec::new(), Vec::new());
        for (l, x) in feats.iter().enumerate() {
            let c = self.cls_convs.forward_t(l, x, train);
            let r = self.reg_convs.forward_t(l, x, train);
            cls.push(c.apply(&self.rtm_cls[l]));
            reg.push(r.apply(&self.rtm_reg[l]).exp() * STRIDES[l] as f64);
        }
        Outputs {
            cls: flat(&cls),
            reg: flat(&reg),
            ctr: None,
        }
    }

    fn targets(&self, out: &Outputs, gts: &GtBatch, _step: i64) -> Result<Targets> {
        Ok(Targets::Rtmdet(self.head.targets(
            &self.priors,
            &self.counts,
            &self.valid,
            &self.metas,
            &self.decoded(out)?,
            &out.cls,
            gts,
        )?))
    }

    /// RTMDetHead.loss_by_feat: QFL over all priors and GIoU of the decoded boxes, each
    /// divided by its sum of the assign metrics.
    fn losses(&self, out: &Outputs, t: &Targets, fused: bool) -> Result<Vec<Tensor>> {
        let Targets::Rtmdet(t) = t else {
            anyhow::bail!("RTMDetHead: RTMDet targets expected");
        };
        let c = out.cls.size()[2];
        let (cls_avg, bbox_avg) = t.avg_factors()?;
        let labels = t.labels.reshape([-1]);
        let metrics = t.assign_metrics.reshape([-1]);
        let loss_cls = call(
            &*self.loss_cls,
            fused,
            &out.cls.reshape([-1, c]),
            (&labels, &metrics).into(),
            &LossArgs::new()
                .weight(&t.label_weights.reshape([-1]))
                .avg_factor(1.0),
        )? / cls_avg;
        let loss_bbox = call(
            &*self.loss_bbox,
            fused,
            &self.decoded(out)?.reshape([-1, 4]),
            (&t.bbox_targets.reshape([-1, 4])).into(),
            &LossArgs::new().weight(&metrics).avg_factor(1.0),
        )? / bbox_avg;
        Ok(vec![loss_cls, loss_bbox])
    }

    /// sigmoid(class); the boxes clipped to the image.
    fn predict(&self, out: &Outputs) -> Result<(Tensor, Tensor)> {
        let b = out.cls.size()[0];
        let points = self
            .priors
            .narrow(1, 0, 2)
            .unsqueeze(0)
            .expand([b, -1, 2], false);
        let boxes = distance2bbox(
            &points,
            &out.reg,
            Some(MaxShape::Image(self.size, self.size)),
        )?;
        Ok((out.cls.sigmoid(), boxes))
    }
}
