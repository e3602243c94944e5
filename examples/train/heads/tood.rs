//! `TOODHead` (anchor-free, as `tood_r50_fpn_1x_coco.py`): task-interactive convolutions, the
//! classification and regression `TaskDecomposition`s with layer attention, the class
//! probability map joined to the class logits by a sigmoid geometric mean, box distances
//! `Scale(exp(·))` in strides from the anchor centres, refined by `deform_sampling` at learnt
//! offsets. Training: the first steps (MMDetection's `initial_epoch`) take ATSSHead's targets
//! from the `initial_assigner` with FocalLoss on probabilities (`activated`) and GIoU weighted by
//! the centerness targets; the rest TaskAlignedAssigner's with QualityFocalLoss on
//! probabilities and GIoU weighted by the normalised alignment metrics.

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use tch::{nn, Kind, Tensor};
use tch_detloss::dense_heads::{DenseHeadTargets, ImageMeta, TOODHeadTargets};
use tch_detloss::task_modules::{distance2bbox, GtBatch};
use tch_detloss::{registry, Loss, LossArgs};

use super::{call, divisor, flat, prior_strides, Head, Outputs, Setup, Targets};
use crate::model::{conv, prior_bias, scales, ConvGn, STRIDES, WIDTH};

/// The task-interactive convolutions (`stacked_convs`).
const STACKED: i64 = 2;

/// The head's config, its anchors at 4 × stride for the small images.
fn config(classes: i64) -> Value {
    json!({
        "type": "TOODHead", "num_classes": classes, "stacked_convs": STACKED,
        "anchor_type": "anchor_free",
        "anchor_generator": {"type": "AnchorGenerator", "ratios": [1.0], "octave_base_scale": 4,
                             "scales_per_octave": 1, "strides": STRIDES},
        "initial_loss_cls": {"type": "FocalLoss", "use_sigmoid": true, "activated": true,
                             "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0},
        "loss_cls": {"type": "QualityFocalLoss", "use_sigmoid": true, "activated": true,
                     "beta": 2.0, "loss_weight": 1.0},
        "loss_bbox": {"type": "GIoULoss", "loss_weight": 2.0},
        "train_cfg": {"initial_epoch": 4, "initial_assigner": {"type": "ATSSAssigner", "topk": 9},
                      "assigner": {"type": "TaskAlignedAssigner", "topk": 13},
                      "alpha": 1, "beta": 6, "allowed_border": -1, "pos_weight": -1}
    })
}

/// The initial epochs' targets: ATSSHead's, from the same anchors and the `initial_assigner`.
fn initial_config(cfg: &Value) -> Value {
    json!({
        "type": "ATSSHead", "num_classes": cfg["num_classes"],
        "anchor_generator": cfg["anchor_generator"],
        "train_cfg": {"assigner": cfg["train_cfg"]["initial_assigner"],
                      "allowed_border": cfg["train_cfg"]["allowed_border"],
                      "pos_weight": cfg["train_cfg"]["pos_weight"]}
    })
}

/// `TaskDecomposition`: layer attention over the stacked features scales a 1×1 reduction.
struct TaskDecomposition {
    la1: nn::Conv2D,
    la2: nn::Conv2D,
    reduction: ConvGn,
}

impl TaskDecomposition {
    fn new(vs: nn::Path) -> Self {
        let inc = WIDTH * STACKED;
        let down = STACKED * 8;
        Self {
            la1: conv(&vs / "la1", inc, inc / down, 1, Some(0.001), 0.0),
            la2: conv(&vs / "la2", inc / down, STACKED, 1, Some(0.001), 0.0),
            reduction: ConvGn::new(&vs / "reduction_conv", inc, WIDTH, 1, 1, Some(0.01)),
        }
    }
    fn forward(&self, feat: &Tensor, avg_feat: &Tensor) -> Tensor {
        let s = feat.size();
        let (b, h, w) = (s[0], s[2], s[3]);
        let weight = avg_feat.apply(&self.la1).relu().apply(&self.la2).sigmoid();
        // The attention folded into the reduction's weight, then one batched matmul.
        let conv_weight = weight.reshape([b, 1, STACKED, 1])
            * self.reduction.weight().reshape([1, WIDTH, STACKED, WIDTH]);
        let conv_weight = conv_weight.reshape([b, WIDTH, WIDTH * STACKED]);
        let out = conv_weight
            .bmm(&feat.reshape([b, WIDTH * STACKED, h * w]))
            .reshape([b, WIDTH, h, w]);
        self.reduction.norm_act(&out)
    }
}

pub struct Tood {
    inter_convs: Vec<ConvGn>,
    cls_decomp: TaskDecomposition,
    reg_decomp: TaskDecomposition,
    tood_cls: nn::Conv2D,
    tood_reg: nn::Conv2D,
    cls_prob: [nn::Conv2D; 2],
    reg_offset: [nn::Conv2D; 2],
    scales: Vec<Tensor>,
    head: TOODHeadTargets,
    initial: DenseHeadTargets,
    initial_steps: i64,
    initial_loss_cls: Box<dyn Loss>,
    loss_cls: Box<dyn Loss>,
    loss_bbox: Box<dyn Loss>,
    anchors: Tensor,
    /// `(N, 2)`: the anchor centres.
    centres: Tensor,
    strides: Tensor,
    counts: Vec<i64>,
    valid: Tensor,
    metas: Vec<ImageMeta>,
}

impl Tood {
    pub fn new(vs: &nn::Path, classes: i64, setup: &Setup) -> Result<Self> {
        let cfg = config(classes);
        let head = TOODHeadTargets::from_config(&cfg)?;
        let initial = DenseHeadTargets::from_config(&initial_config(&cfg))?;
        let metas = setup.metas();
        let (anchors, valid, counts) = head.anchors(&setup.featmaps(), &metas, setup.device)?;
        let centres = Tensor::stack(
            &[
                (anchors.select(1, 0) + anchors.select(1, 2)) / 2.0,
                (anchors.select(1, 1) + anchors.select(1, 3)) / 2.0,
            ],
            -1,
        );
        let inc = WIDTH * STACKED;
        Ok(Self {
            inter_convs: (0..STACKED)
                .map(|i| {
                    ConvGn::new(
                        vs / format!("inter_convs{i}"),
                        WIDTH,
                        WIDTH,
                        3,
                        1,
                        Some(0.01),
                    )
                })
                .collect(),
            cls_decomp: TaskDecomposition::new(vs / "cls_decomp"),
            reg_decomp: TaskDecomposition::new(vs / "reg_decomp"),
            tood_cls: conv(vs / "tood_cls", WIDTH, classes, 3, Some(0.01), prior_bias()),
            tood_reg: conv(vs / "tood_reg", WIDTH, 4, 3, Some(0.01), 0.0),
            cls_prob: [
                conv(vs / "cls_prob0", inc, WIDTH / 4, 1, Some(0.01), 0.0),
                conv(vs / "cls_prob1", WIDTH / 4, 1, 3, Some(0.01), prior_bias()),
            ],
            reg_offset: [
                conv(vs / "reg_offset0", inc, WIDTH / 4, 1, Some(0.001), 0.0),
                conv(vs / "reg_offset1", WIDTH / 4, 8, 3, Some(0.001), 0.0),
            ],
            scales: scales(vs / "scales", STRIDES.len()),
            initial_steps: setup.initial_steps,
            initial_loss_cls: registry::build(&cfg["initial_loss_cls"])?,
            loss_cls: registry::build(&cfg["loss_cls"])?,
            loss_bbox: registry::build(&cfg["loss_bbox"])?,
            strides: prior_strides(&counts, setup.device),
            head,
            initial,
            anchors,
            centres,
            counts,
            valid,
            metas,
        })
    }
}

/// `deform_sampling`: each of the 4 box channels sampled bilinearly at its own learnt offset
/// (`offset` `(B, 8, H, W)`: dy, dx per channel), zero outside the map; mmcv's 1×1
/// `deform_conv2d` with unit weights, written as `grid_sample` (align_corners, zero padding).
fn deform_sampling(feat: &Tensor, offset: &Tensor) -> Tensor {
    let s = feat.size();
    let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
    let off = offset.view([b, c, 2, h, w]);
    let opts = (Kind::Float, feat.device());
    let ys = Tensor::arange(h, opts).view([1, 1, h, 1]) + off.select(2, 0);
    let xs = Tensor::arange(w, opts).view([1, 1, 1, w]) + off.select(2, 1);
    let gx = xs * (2.0 / (w - 1).max(1) as f64) - 1.0;
    let gy = ys * (2.0 / (h - 1).max(1) as f64) - 1.0;
    let grid = Tensor::stack(&[gx, gy], -1).view([b * c, h, w, 2]);
    Tensor::grid_sampler(&feat.reshape([b * c, 1, h, w]), &grid, 0, 0, true).view([b, c, h, w])
}

impl Head for Tood {
    fn loss_names(&self) -> &'static [&'static str] {
        &["loss_cls", "loss_bbox"]
    }

    fn num_priors(&self) -> i64 {
        self.anchors.size()[0]
    }

    /// Class probabilities (the geometric mean of the two sigmoids) and boxes in strides.
    fn forward_t(&self, feats: &[Tensor], _train: bool) -> Outputs {
        let (mut cls, mut reg) = (Vec::new(), Vec::new());
        let levels = self.centres.split_with_sizes(self.counts.as_slice(), 0);
        for (l, x) in feats.iter().enumerate() {
            let s = x.size();
            let (b, h, w) = (s[0], s[2], s[3]);
            let mut inter = Vec::new();
            let mut y = x.shallow_clone();
            for m in &self.inter_convs {
                y = m.forward(&y);
                inter.push(y.shallow_clone());
            }
            let feat = Tensor::cat(&inter, 1);
            let avg = feat.adaptive_avg_pool2d([1, 1]);
            let cls_feat = self.cls_decomp.forward(&feat, &avg);
            let reg_feat = self.reg_decomp.forward(&feat, &avg);
            let logits = cls_feat.apply(&self.tood_cls);
            let prob = feat
                .apply(&self.cls_prob[0])
                .relu()
                .apply(&self.cls_prob[1]);
            cls.push((logits.sigmoid() * prob.sigmoid()).sqrt());
            let dist = (reg_feat.apply(&self.tood_reg).exp() * &self.scales[l])
                .permute([0, 2, 3, 1])
                .reshape([b, h * w, 4]);
            let centres = (&levels[l] / STRIDES[l] as f64)
                .unsqueeze(0)
                .expand([b, h * w, 2], false);
            let reg_bbox = distance2bbox(&centres, &dist, None)
                .expect("centres and distances are (B, HW, 2) and (B, HW, 4)")
                .reshape([b, h, w, 4])
                .permute([0, 3, 1, 2]);
            let offset = feat
                .apply(&self.reg_offset[0])
                .relu()
                .apply(&self.reg_offset[1]);
            let pred = deform_sampling(&reg_bbox, &offset);
            // Sampling can turn a box inside out, which would make GIoU negative.
            let invalid = pred
                .narrow(1, 0, 1)
                .gt_tensor(&pred.narrow(1, 2, 1))
                .logical_or(&pred.narrow(1, 1, 1).gt_tensor(&pred.narrow(1, 3, 1)))
                .expand_as(&pred);
            reg.push(reg_bbox.where_self(&invalid, &pred));
        }
        Outputs {
            cls: flat(&cls),
            reg: flat(&reg),
            ctr: None,
        }
    }

    fn targets(&self, out: &Outputs, gts: &GtBatch, step: i64) -> Result<Targets> {
        if step < self.initial_steps {
            return Ok(Targets::Anchor(self.initial.targets_for(
                &self.anchors,
                &self.counts,
                &self.valid,
                &self.metas,
                gts,
                None,
            )?));
        }
        let decoded = &out.reg * &self.strides;
        Ok(Targets::Tood(self.head.targets(
            &self.anchors,
            &self.counts,
            &self.valid,
            &self.metas,
            &decoded,
            &out.cls,
            gts,
        )?))
    }

    /// TOODHead.loss_by_feat: the classification loss over all anchors divided by the sum of
    /// the alignment metrics (the positives in the initial steps), GIoU of the boxes in strides
    /// divided by the sum of its weights.
    fn losses(&self, out: &Outputs, t: &Targets, fused: bool) -> Result<Vec<Tensor>> {
        let c = out.cls.size()[2];
        let cls = out.cls.reshape([-1, c]);
        let pred = out.reg.reshape([-1, 4]);
        let (loss_cls, weight, target) = match t {
            Targets::Anchor(t) => {
                let labels = t.labels.reshape([-1]);
                let cls_avg = divisor(&t.avg_factor)?;
                let l = call(
                    &*self.initial_loss_cls,
                    fused,
                    &cls,
                    (&labels).into(),
                    &LossArgs::new()
                        .weight(&t.label_weights.reshape([-1]))
                        .avg_factor(1.0),
                )? / cls_avg;
                (l, t.centerness.reshape([-1]), &t.bbox_targets)
            }
            Targets::Tood(t) => {
                let labels = t.labels.reshape([-1]);
                let metrics = t.alignment_metrics.reshape([-1]);
                let cls_avg = divisor(&metrics.sum(Kind::Float))?;
                let l = call(
                    &*self.loss_cls,
                    fused,
                    &cls,
                    (&labels, &metrics).into(),
                    &LossArgs::new()
                        .weight(&t.label_weights.reshape([-1]))
                        .avg_factor(1.0),
                )? / cls_avg;
                (l, metrics, &t.bbox_targets)
            }
            _ => anyhow::bail!("TOODHead: anchor or TOOD targets expected"),
        };
        ensure!(
            weight.size()[0] == pred.size()[0],
            "TOODHead: targets for other anchors"
        );
        let target = (target / &self.strides).reshape([-1, 4]);
        let bbox_avg = divisor(&weight.sum(Kind::Float))?;
        let loss_bbox = call(
            &*self.loss_bbox,
            fused,
            &pred,
            (&target).into(),
            &LossArgs::new().weight(&weight).avg_factor(1.0),
        )? / bbox_avg;
        Ok(vec![loss_cls, loss_bbox])
    }

    /// The class probabilities as they are; the boxes times the stride.
    fn predict(&self, out: &Outputs) -> Result<(Tensor, Tensor)> {
        Ok((out.cls.shallow_clone(), &out.reg * &self.strides))
    }
}
