//! What is profiled: one entry per loss, with the shapes and inputs of the head that uses it.
//! Adding a loss to the profile is one entry in [`WORKLOADS`].

use anyhow::Result;
use tch::{Device, Kind, Tensor};
use tch_detloss::losses::ae::ImageMatch;
use tch_detloss::losses::DDQAuxLoss;
use tch_detloss::{Loss, LossArgs, Target};

/// Fraction of anchors that are positive, and of anchors that are ignored (weight 0).
const POSITIVE_FRACTION: f64 = 0.01;
const IGNORED_FRACTION: f64 = 0.05;

/// One profiled loss.
pub struct Workload {
    /// The row's name: the MMDetection class, and the form where it has several.
    pub name: &'static str,
    /// The MMDetection config dict it is built from.
    pub config: &'static str,
    /// (rows, columns) on the CPU and on CUDA.
    pub cpu_shape: (i64, i64),
    pub cuda_shape: (i64, i64),
    /// The dtypes timed on CUDA (the CPU times float32).
    pub cuda_kinds: &'static [Kind],
    /// The inputs its head gives it.
    pub inputs: fn(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs>,
}

/// 2 images x 20,000 anchors on the CPU; 16 images x 100,000 anchors (a RetinaNet batch) on CUDA.
const ANCHORS: ((i64, i64), (i64, i64)) = ((40_000, 80), (1_600_000, 80));
const F32: &[Kind] = &[Kind::Float];

pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "FocalLoss",
        config: r#"{"type": "FocalLoss"}"#,
        cpu_shape: ANCHORS.0,
        cuda_shape: ANCHORS.1,
        cuda_kinds: &[Kind::Float, Kind::BFloat16, Kind::Half],
        inputs: labelled_anchors,
    },
    Workload {
        name: "QualityFocalLoss",
        config: r#"{"type": "QualityFocalLoss"}"#,
        cpu_shape: ANCHORS.0,
        cuda_shape: ANCHORS.1,
        cuda_kinds: F32,
        inputs: quality_anchors,
    },
    Workload {
        name: "VarifocalLoss",
        config: r#"{"type": "VarifocalLoss"}"#,
        cpu_shape: ANCHORS.0,
        cuda_shape: ANCHORS.1,
        cuda_kinds: F32,
        inputs: varifocal_anchors,
    },
    // An LVIS-sized RoI head: 16 images x 512 RoIs, 1,203 classes + background.
    Workload {
        name: "CrossEntropyLoss softmax",
        config: r#"{"type": "CrossEntropyLoss"}"#,
        cpu_shape: (8_192, 1_204),
        cuda_shape: (8_192, 1_204),
        cuda_kinds: &[Kind::Float, Kind::BFloat16],
        inputs: roi_classes,
    },
    Workload {
        name: "CrossEntropyLoss sigmoid",
        config: r#"{"type": "CrossEntropyLoss", "use_sigmoid": true}"#,
        cpu_shape: ANCHORS.0,
        cuda_shape: ANCHORS.1,
        cuda_kinds: F32,
        inputs: labelled_anchors,
    },
    // LVIS's Seesaw RoI head: 1,203 classes + background, 2 objectness logits.
    Workload {
        name: "SeesawLoss",
        config: r#"{"type": "SeesawLoss", "num_classes": 1203}"#,
        cpu_shape: (8_192, 1_205),
        cuda_shape: (8_192, 1_205),
        cuda_kinds: F32,
        inputs: seesaw_rois,
    },
    // The same RoIs under EQLv2: 1,203 classes + the objectness column (composed of stock ops:
    // 1.0x).
    Workload {
        name: "EQLV2Loss",
        config: r#"{"type": "EQLV2Loss", "num_classes": 1203}"#,
        cpu_shape: (8_192, 1_204),
        cuda_shape: (8_192, 1_204),
        cuda_kinds: F32,
        inputs: roi_classes,
    },
    // QDTrack's embedding match: 512 key against 256 reference embeddings (composed of stock
    // ops: 1.0x).
    Workload {
        name: "MultiPosCrossEntropyLoss",
        config: r#"{"type": "MultiPosCrossEntropyLoss"}"#,
        cpu_shape: (512, 256),
        cuda_shape: (512, 256),
        cuda_kinds: F32,
        inputs: track_matches,
    },
    // QDTrack's L2 embedding losses on the same matches, 3 negatives per positive, the hardest
    // (composed of stock ops: 1.0x).
    Workload {
        name: "L2Loss",
        config: r#"{"type": "L2Loss", "neg_pos_ub": 3, "hard_mining": true}"#,
        cpu_shape: (512, 256),
        cuda_shape: (512, 256),
        cuda_kinds: F32,
        inputs: track_matches,
    },
    Workload {
        name: "MarginL2Loss",
        config: r#"{"type": "MarginL2Loss", "neg_pos_ub": 3, "hard_mining": true}"#,
        cpu_shape: (512, 256),
        cuda_shape: (512, 256),
        cuda_kinds: F32,
        inputs: track_matches,
    },
    // A re-identification batch: 128 embeddings of 2,048, 32 ids (composed of stock ops: 1.0x).
    Workload {
        name: "TripletLoss",
        config: r#"{"type": "TripletLoss"}"#,
        cpu_shape: (128, 2_048),
        cuda_shape: (128, 2_048),
        cuda_kinds: F32,
        inputs: reid_embeddings,
    },
    // CornerNet's embedding heads: 128 x 128 maps, D = 1, 32 objects per image; rows are
    // images x 128 (composed of stock ops: 1.0x).
    Workload {
        name: "AssociativeEmbeddingLoss",
        config: r#"{"type": "AssociativeEmbeddingLoss"}"#,
        cpu_shape: (2 * 128, 128),
        cuda_shape: (16 * 128, 128),
        cuda_kinds: F32,
        inputs: corner_embeddings,
    },
    // DDQ-DETR's dense queries: 2 images x 1,350 queries x 80 classes, 7 ground truths each,
    // topk 8; rows are images x 1,350. Through `DdqProfiled`: the matching on the host, then
    // QualityFocalLoss and GIoULoss, fused against their compositions.
    Workload {
        name: "DDQAuxLoss",
        config: r#"{"type": "DDQAuxLoss/profile"}"#,
        cpu_shape: (2 * DDQ_QUERIES, 80),
        cuda_shape: (16 * DDQ_QUERIES, 80),
        cuda_kinds: F32,
        inputs: dense_queries,
    },
    // V3Det's custom-channel forms: the same kernels as FocalLoss and CrossEntropyLoss.
    Workload {
        name: "FocalCustomLoss",
        config: r#"{"type": "FocalCustomLoss", "num_classes": 80}"#,
        cpu_shape: ANCHORS.0,
        cuda_shape: ANCHORS.1,
        cuda_kinds: F32,
        inputs: labelled_anchors,
    },
    Workload {
        name: "CrossEntropyCustomLoss",
        config: r#"{"type": "CrossEntropyCustomLoss", "num_classes": 1203}"#,
        cpu_shape: (8_192, 1_204),
        cuda_shape: (8_192, 1_204),
        cuda_kinds: F32,
        inputs: roi_classes,
    },
    // CenterNet's heatmap: 2 images x 80 classes x 128 x 128 on the CPU (16 on CUDA), as rows of
    // 128; the kernel sees any rank as rows.
    Workload {
        name: "GaussianFocalLoss",
        config: r#"{"type": "GaussianFocalLoss", "loss_weight": 1.0}"#,
        cpu_shape: (2 * 80 * 128, 128),
        cuda_shape: (16 * 80 * 128, 128),
        cuda_kinds: F32,
        inputs: heatmaps,
    },
    // LD's distillation of the teacher's side distributions.
    Workload {
        name: "KnowledgeDistillationKLDivLoss",
        config: r#"{"type": "KnowledgeDistillationKLDivLoss", "T": 10}"#,
        cpu_shape: (4 * 4_000, 17),
        cuda_shape: (4 * 160_000, 17),
        cuda_kinds: F32,
        inputs: teacher_distributions,
    },
    // A mask head's 100 instance masks of 112 x 112 (composed of stock ops: 1.0x).
    Workload {
        name: "DiceLoss",
        config: r#"{"type": "DiceLoss"}"#,
        cpu_shape: (100, 112 * 112),
        cuda_shape: (1_600, 112 * 112),
        cuda_kinds: F32,
        inputs: instance_masks,
    },
    // GFL's box branch: 4 sides per anchor, reg_max 16.
    Workload {
        name: "DistributionFocalLoss",
        config: r#"{"type": "DistributionFocalLoss"}"#,
        cpu_shape: (4 * 40_000, 17),
        cuda_shape: (4 * 1_600_000, 17),
        cuda_kinds: F32,
        inputs: side_distributions,
    },
    Workload {
        name: "GHMC",
        config: r#"{"type": "GHMC", "bins": 30, "momentum": 0.75}"#,
        cpu_shape: ANCHORS.0,
        cuda_shape: ANCHORS.1,
        cuda_kinds: F32,
        inputs: labelled_anchors,
    },
    // A box head over all anchors, weight 0 for the 99 % that are not positive (no gather).
    Workload {
        name: "GIoULoss all anchors",
        config: r#"{"type": "GIoULoss", "loss_weight": 2.0}"#,
        cpu_shape: BOX_ANCHORS.0,
        cuda_shape: BOX_ANCHORS.1,
        cuda_kinds: &[Kind::Float, Kind::BFloat16],
        inputs: all_anchor_boxes,
    },
    // The same head after gathering its positives.
    Workload {
        name: "GIoULoss positives",
        config: r#"{"type": "GIoULoss", "loss_weight": 2.0}"#,
        cpu_shape: POSITIVE_BOXES,
        cuda_shape: POSITIVE_BOXES,
        cuda_kinds: F32,
        inputs: positive_boxes,
    },
    Workload {
        name: "DIoULoss positives",
        config: r#"{"type": "DIoULoss"}"#,
        cpu_shape: POSITIVE_BOXES,
        cuda_shape: POSITIVE_BOXES,
        cuda_kinds: F32,
        inputs: positive_boxes,
    },
    Workload {
        name: "CIoULoss positives",
        config: r#"{"type": "CIoULoss"}"#,
        cpu_shape: POSITIVE_BOXES,
        cuda_shape: POSITIVE_BOXES,
        cuda_kinds: F32,
        inputs: positive_boxes,
    },
    Workload {
        name: "EIoULoss positives",
        config: r#"{"type": "EIoULoss"}"#,
        cpu_shape: POSITIVE_BOXES,
        cuda_shape: POSITIVE_BOXES,
        cuda_kinds: F32,
        inputs: positive_boxes,
    },
    Workload {
        name: "SIoULoss positives",
        config: r#"{"type": "SIoULoss"}"#,
        cpu_shape: POSITIVE_BOXES,
        cuda_shape: POSITIVE_BOXES,
        cuda_kinds: F32,
        inputs: positive_boxes,
    },
    Workload {
        name: "BoundedIoULoss positives",
        config: r#"{"type": "BoundedIoULoss"}"#,
        cpu_shape: POSITIVE_BOXES,
        cuda_shape: POSITIVE_BOXES,
        cuda_kinds: F32,
        inputs: positive_box_coordinates,
    },
    // RetinaNet's box branch: deltas of every anchor, bbox_weights 1 on the positives.
    Workload {
        name: "SmoothL1Loss",
        config: r#"{"type": "SmoothL1Loss", "beta": 0.11}"#,
        cpu_shape: BOX_ANCHORS.0,
        cuda_shape: BOX_ANCHORS.1,
        cuda_kinds: F32,
        inputs: anchor_deltas,
    },
    Workload {
        name: "L1Loss",
        config: r#"{"type": "L1Loss"}"#,
        cpu_shape: BOX_ANCHORS.0,
        cuda_shape: BOX_ANCHORS.1,
        cuda_kinds: F32,
        inputs: anchor_deltas,
    },
    Workload {
        name: "BalancedL1Loss",
        config: r#"{"type": "BalancedL1Loss"}"#,
        cpu_shape: BOX_ANCHORS.0,
        cuda_shape: BOX_ANCHORS.1,
        cuda_kinds: F32,
        inputs: anchor_deltas,
    },
    // An MSE regression head on the same deltas.
    Workload {
        name: "MSELoss",
        config: r#"{"type": "MSELoss"}"#,
        cpu_shape: BOX_ANCHORS.0,
        cuda_shape: BOX_ANCHORS.1,
        cuda_kinds: F32,
        inputs: anchor_deltas,
    },
    // GHM RetinaNet's box branch on its sampled anchors.
    Workload {
        name: "GHMR",
        config: r#"{"type": "GHMR", "mu": 0.02, "bins": 10, "momentum": 0.7}"#,
        cpu_shape: (40_000, 4),
        cuda_shape: (40_000, 4),
        cuda_kinds: F32,
        inputs: ghm_deltas,
    },
];

/// Box heads: 2 images x 100,000 anchors on the CPU, 16 on CUDA; 20,000 gathered positives.
const BOX_ANCHORS: ((i64, i64), (i64, i64)) = ((200_000, 4), (1_600_000, 4));
const POSITIVE_BOXES: (i64, i64) = (20_000, 4);

/// The inputs of one loss call, as a head produces them.
pub struct Inputs {
    pub kind: Kind,
    /// Logits, a leaf that requires grad.
    pub pred: Tensor,
    pub target: TargetData,
    /// Label (or sample) weights.
    pub weight: Option<Tensor>,
    /// The number of positives (at least 1), a 0-dim float32 tensor on the device.
    pub avg_factor: Option<Tensor>,
}

/// The target a loss gets from its head.
pub enum TargetData {
    /// One tensor: class indices, a dense target or one value per row.
    One(Tensor),
    /// QualityFocalLoss: the labels and the IoU quality of each positive (0 for negatives).
    LabelsScores(Tensor, Tensor),
    /// AssociativeEmbeddingLoss: the bottom-right embeddings and the corner match.
    Corners(Tensor, Vec<ImageMatch>),
}

impl Inputs {
    pub fn target(&self) -> Target<'_> {
        match &self.target {
            TargetData::One(t) | TargetData::Corners(t, _) => Target::Tensor(t),
            TargetData::LabelsScores(labels, scores) => Target::LabelsScores { labels, scores },
        }
    }

    pub fn args(&self) -> LossArgs<'_> {
        let mut args = LossArgs::new();
        if let Some(w) = &self.weight {
            args = args.weight(w);
        }
        if let Some(a) = &self.avg_factor {
            args = args.avg_factor(a);
        }
        if let TargetData::Corners(_, m) = &self.target {
            args = args.corner_match(m);
        }
        args
    }

    /// The fewest bytes the fused pass can move: every input read once (at the element sizes
    /// the kernels read), and for backward the gradient written once more.
    pub fn fused_bytes(&self, forward: bool, backward: bool) -> u64 {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        let pred = (self.pred.numel() * self.kind.elt_size_in_bytes()) as u64;
        let side = match &self.target {
            TargetData::One(t) | TargetData::Corners(t, _) => bytes(t),
            TargetData::LabelsScores(l, s) => bytes(l) + bytes(s),
        } + self.weight.as_ref().map_or(0, bytes);
        let read = pred + side;
        u64::from(forward) * read + u64::from(backward) * (read + pred)
    }
}

fn logits(n: i64, c: i64, kind: Kind, device: Device, mean: f64) -> Result<Tensor> {
    Ok(Tensor::f_randn([n, c], (Kind::Float, device))?
        .f_mul_scalar(1.5)?
        .f_add_scalar(mean)?
        .f_to_kind(kind)?
        .set_requires_grad(true))
}

/// Anchors of a dense head: logits around the prior bias (about -4), 1 % positives with a
/// random class (C = background), 5 % ignored (label weight 0); avg_factor the positives.
fn anchors(n: i64, c: i64, kind: Kind, device: Device) -> Result<(Inputs, Tensor, Tensor)> {
    let f32s = (Kind::Float, device);
    let positive = Tensor::f_rand([n], f32s)?.f_lt(POSITIVE_FRACTION)?;
    let labels =
        Tensor::f_randint(c, [n], (Kind::Int64, device))?.f_where_scalarother(&positive, c)?;
    let weight = Tensor::f_rand([n], f32s)?
        .f_ge(IGNORED_FRACTION)?
        .f_to_kind(Kind::Float)?;
    let avg_factor = positive.f_sum(Kind::Float)?.f_clamp_min(1.0)?;
    let inputs = Inputs {
        kind,
        pred: logits(n, c, kind, device, -4.0)?,
        target: TargetData::One(labels.shallow_clone()),
        weight: Some(weight),
        avg_factor: Some(avg_factor),
    };
    Ok((inputs, labels, positive))
}

/// IoU-like scores in (0.1, 1] for the positives, 0 elsewhere.
fn scores(positive: &Tensor, kind: Kind) -> Result<Tensor> {
    Ok(
        Tensor::f_rand(positive.size(), (Kind::Float, positive.device()))?
            .f_mul_scalar(0.9)?
            .f_add_scalar(0.1)?
            .f_where_scalarother(positive, 0.0)?
            .f_to_kind(kind)?,
    )
}

/// FocalLoss, sigmoid CrossEntropyLoss, GHMC: class indices and label weights.
fn labelled_anchors(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    Ok(anchors(n, c, kind, device)?.0)
}

/// QualityFocalLoss: (labels, IoU scores) and label weights.
fn quality_anchors(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    let (mut x, labels, positive) = anchors(n, c, kind, device)?;
    x.target = TargetData::LabelsScores(labels, scores(&positive, kind)?);
    Ok(x)
}

/// VarifocalLoss: the dense IoU-aware target (the IoU at each positive's class); VFNet passes
/// no weight.
fn varifocal_anchors(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    let (mut x, labels, positive) = anchors(n, c, kind, device)?;
    let dense = labels
        .f_one_hot(c + 1)?
        .f_narrow(1, 0, c)?
        .f_to_kind(kind)?
        .f_mul(&scores(&positive, kind)?.f_unsqueeze(1)?)?;
    x.target = TargetData::One(dense);
    x.weight = None;
    Ok(x)
}

/// `roi_classes` for SeesawLoss's `C - 2` classes (background `C - 2`) and 2 objectness logits.
fn seesaw_rois(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    let mut x = roi_classes(n, c - 1, kind, device)?;
    x.pred = logits(n, c, kind, device, 0.0)?;
    Ok(x)
}

/// Similarities and their match labels: about one positive per row.
fn track_matches(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    let f32s = (Kind::Float, device);
    Ok(Inputs {
        kind,
        pred: logits(n, c, kind, device, 0.0)?,
        target: TargetData::One(
            Tensor::f_rand([n, c], f32s)?
                .f_lt(1.0 / c as f64)?
                .f_to_kind(Kind::Float)?,
        ),
        weight: None,
        avg_factor: None,
    })
}

/// Embeddings of 32 ids, 4 samples each.
fn reid_embeddings(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    Ok(Inputs {
        kind,
        pred: logits(n, c, kind, device, 0.0)?,
        target: TargetData::One(Tensor::f_arange(n, (Kind::Int64, device))?.f_remainder(n / 4)?),
        weight: None,
        avg_factor: None,
    })
}

/// Top-left (pred) and bottom-right (target) corner embeddings `(B, 1, 128, W)`, B = n / 128,
/// and 32 objects per image at random cells.
fn corner_embeddings(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    let (b, h) = ((n / 128).max(1), 128);
    let maps = || -> Result<Tensor> {
        Ok(Tensor::f_randn([b, 1, h, c], (Kind::Float, device))?.f_to_kind(kind)?)
    };
    let cells = Vec::<i64>::try_from(Tensor::f_randint(
        h.min(c),
        [b * 32 * 4],
        (Kind::Int64, Device::Cpu),
    )?)?;
    let matches = cells
        .chunks(32 * 4)
        .map(|img| {
            img.chunks(4)
                .map(|o| [[o[0], o[1]], [o[2], o[3]]])
                .collect()
        })
        .collect();
    Ok(Inputs {
        kind,
        pred: maps()?.f_set_requires_grad(true)?,
        target: TargetData::Corners(maps()?, matches),
        weight: None,
        avg_factor: None,
    })
}

/// DDQ-DETR's dense queries per image.
const DDQ_QUERIES: i64 = 1_350;

/// `DDQAuxLoss` is no [`Loss`] (its call takes per-image ground truths), so the profile times it
/// through this adapter, registered in the profile alone as `DDQAuxLoss/profile`: pred holds
/// the scores and the boxes side by side `(B, Q, C + 4)`, the target the ground truths of every
/// image (labels `(B, G)`, boxes `(B, G, 4)`); `forward` is the sum of all images' losses.
#[derive(Debug)]
struct DdqProfiled(DDQAuxLoss);

impl DdqProfiled {
    fn total(&self, pred: &Tensor, target: Target<'_>, unfused: bool) -> Result<Tensor> {
        let Target::LabelsScores {
            labels,
            scores: gts,
        } = target
        else {
            anyhow::bail!("DDQAuxLoss/profile takes (ground-truth labels, boxes)");
        };
        let c = pred.size()[2] - 4;
        let (scores, boxes) = (pred.f_narrow(2, 0, c)?, pred.f_narrow(2, c, 4)?);
        let b = pred.size()[0];
        let gt_boxes: Vec<Tensor> = (0..b).map(|i| gts.get(i)).collect();
        let gt_labels: Vec<Tensor> = (0..b).map(|i| labels.get(i)).collect();
        let shapes = vec![(640, 640); b as usize];
        let out = if unfused {
            self.0
                .loss_unfused(&scores, &boxes, &gt_boxes, &gt_labels, &shapes)?
        } else {
            self.0
                .loss(&scores, &boxes, &gt_boxes, &gt_labels, &shapes)?
        };
        let mut total = pred.f_sum(Kind::Float)?.f_mul_scalar(0.0)?;
        for l in out.aux_loss_cls.iter().chain(&out.aux_loss_bbox) {
            total = total.f_add(l)?;
        }
        Ok(total)
    }
}

impl Loss for DdqProfiled {
    fn type_name(&self) -> &str {
        "DDQAuxLoss/profile"
    }
    fn forward(&self, pred: &Tensor, target: Target<'_>, _: &LossArgs<'_>) -> Result<Tensor> {
        self.total(pred, target, false)
    }
    fn forward_unfused(
        &self,
        pred: &Tensor,
        target: Target<'_>,
        _: &LossArgs<'_>,
    ) -> Result<Tensor> {
        self.total(pred, target, true)
    }
}

/// Registers the profile's adapters (`DdqProfiled`) with the loss registry.
pub fn register_adapters() -> Result<()> {
    tch_detloss::registry::register(
        "DDQAuxLoss/profile",
        Box::new(|_| {
            let loss = DDQAuxLoss::from_config(&serde_json::json!({"type": "DDQAuxLoss"}))?;
            Ok(Box::new(DdqProfiled(loss)) as Box<dyn Loss>)
        }),
    )
}

/// DDQ-DETR's dense queries: probabilities around 0.12 and boxes of 8 to 88 pixels in a
/// 640 x 640 image, side by side `(B, Q, C + 4)`, B = n / 1,350; 7 ground truths per image.
fn dense_queries(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    let (b, q, g) = ((n / DDQ_QUERIES).max(1), DDQ_QUERIES, 7);
    let f32s = (Kind::Float, device);
    let boxes = |m: i64| -> Result<Tensor> {
        let xy = Tensor::f_rand([b, m, 2], f32s)?.f_mul_scalar(552.0)?;
        let wh = Tensor::f_rand([b, m, 2], f32s)?
            .f_mul_scalar(80.0)?
            .f_add_scalar(8.0)?;
        Ok(Tensor::f_cat(&[&xy, &xy.f_add(&wh)?], 2)?)
    };
    let scores = Tensor::f_randn([b, q, c], f32s)?
        .f_sub_scalar(2.0)?
        .f_sigmoid()?;
    let pred = Tensor::f_cat(&[&scores, &boxes(q)?], 2)?
        .f_to_kind(kind)?
        .set_requires_grad(true);
    let labels = Tensor::f_randint(c, [b, g], (Kind::Int64, device))?;
    Ok(Inputs {
        kind,
        pred,
        target: TargetData::LabelsScores(labels, boxes(g)?.f_to_kind(kind)?),
        weight: None,
        avg_factor: None,
    })
}

/// CenterNet's heatmap head: sigmoid probabilities against gaussian peaks (mostly near 0, one
/// peak of exactly 1 in about 5,000 pixels), avg_factor the peak count.
fn heatmaps(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    let pred = logits(n, c, kind, device, -2.0)?
        .f_sigmoid()?
        .f_clamp(1e-4, 1.0 - 1e-4)?
        .f_detach()?
        .f_set_requires_grad(true)?;
    let u = Tensor::f_rand([n, c], (Kind::Float, device))?;
    let peaks = u.f_gt(1.0 - 2e-4)?;
    let heat = u
        .f_pow_tensor_scalar(12)?
        .f_where_scalarother(&peaks.f_logical_not()?, 1.0)?;
    Ok(Inputs {
        kind,
        pred,
        target: TargetData::One(heat.f_to_kind(kind)?),
        weight: None,
        avg_factor: Some(peaks.f_sum(Kind::Float)?.f_clamp_min(1.0)?),
    })
}

/// A RoI head's softmax classifier: logits around 0, a class per RoI (a quarter background,
/// the last class), label weights, avg_factor the RoI count.
fn roi_classes(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    let background = Tensor::f_rand([n], (Kind::Float, device))?.f_lt(0.25)?;
    let labels = Tensor::f_randint(c, [n], (Kind::Int64, device))?
        .f_where_scalarother(&background, c - 1)?;
    Ok(Inputs {
        kind,
        pred: logits(n, c, kind, device, 0.0)?,
        target: TargetData::One(labels),
        weight: Some(Tensor::f_ones([n], (Kind::Float, device))?),
        avg_factor: Some(Tensor::from(n as f32).f_to_device(device)?),
    })
}

/// GFL's distribution of each box side over `c = reg_max + 1` bins: a distance in [0, reg_max),
/// the positive anchor's weight (its quality score), avg_factor a quarter of the sides.
fn side_distributions(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    let f32s = (Kind::Float, device);
    let reg_max = (c - 1) as f64;
    Ok(Inputs {
        kind,
        pred: logits(n, c, kind, device, 0.0)?,
        target: TargetData::One(
            Tensor::f_rand([n], f32s)?
                .f_mul_scalar(reg_max * 0.999)?
                .f_to_kind(kind)?,
        ),
        weight: Some(Tensor::f_rand([n], f32s)?),
        avg_factor: Some(Tensor::from(n as f32 / 4.0).f_to_device(device)?),
    })
}

/// A student's and a teacher's logits over the bins of each side.
fn teacher_distributions(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    Ok(Inputs {
        kind,
        pred: logits(n, c, kind, device, 0.0)?,
        target: TargetData::One(logits(n, c, kind, device, 0.0)?.f_detach()?),
        weight: Some(Tensor::f_rand([n], (Kind::Float, device))?),
        avg_factor: Some(Tensor::from(n as f32 / 4.0).f_to_device(device)?),
    })
}

/// Mask logits and binary ground-truth masks, one flattened mask per row.
fn instance_masks(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    Ok(Inputs {
        kind,
        pred: logits(n, c, kind, device, 0.0)?,
        target: TargetData::One(
            Tensor::f_rand([n, c], (Kind::Float, device))?
                .f_gt(0.6)?
                .f_to_kind(Kind::Float)?,
        ),
        weight: None,
        avg_factor: Some(Tensor::from(n as f32).f_to_device(device)?),
    })
}

/// xyxy target boxes and predictions near them (a trained head's), `(n, 4)`.
fn box_pair(n: i64, kind: Kind, device: Device) -> Result<(Tensor, Tensor)> {
    let f32s = (Kind::Float, device);
    let lo = Tensor::f_rand([n, 2], f32s)?.f_mul_scalar(800.0)?;
    let size = Tensor::f_rand([n, 2], f32s)?
        .f_mul_scalar(200.0)?
        .f_add_scalar(8.0)?;
    let target = Tensor::f_cat(&[&lo, &lo.f_add(&size)?], 1)?;
    let noise = Tensor::f_randn([n, 4], f32s)?.f_mul(&size.f_repeat([1, 2])?.f_mul_scalar(0.1)?)?;
    let pred = target
        .f_add(&noise)?
        .f_to_kind(kind)?
        .set_requires_grad(true);
    Ok((pred, target.f_to_kind(kind)?))
}

/// A box loss over every anchor: weight 1 on the 1 % positives, 0 elsewhere; avg_factor their
/// count.
fn all_anchor_boxes(n: i64, _c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    let (pred, target) = box_pair(n, kind, device)?;
    let positive = Tensor::f_rand([n], (Kind::Float, device))?.f_lt(POSITIVE_FRACTION)?;
    Ok(Inputs {
        kind,
        pred,
        target: TargetData::One(target),
        avg_factor: Some(positive.f_sum(Kind::Float)?.f_clamp_min(1.0)?),
        weight: Some(positive.f_to_kind(kind)?),
    })
}

/// Gathered positive boxes, with their centerness (or quality) as the weight.
fn positive_boxes(n: i64, _c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    let (pred, target) = box_pair(n, kind, device)?;
    let weight = Tensor::f_rand([n], (Kind::Float, device))?.f_to_kind(kind)?;
    Ok(Inputs {
        kind,
        pred,
        target: TargetData::One(target),
        avg_factor: Some(weight.f_sum(Kind::Float)?),
        weight: Some(weight),
    })
}

/// `positive_boxes` with the weight as an (N, 1) column: BoundedIoULoss's loss is per
/// coordinate, (N, 4).
fn positive_box_coordinates(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    let mut x = positive_boxes(n, c, kind, device)?;
    x.weight = x.weight.map(|w| w.f_unsqueeze(1)).transpose()?;
    Ok(x)
}

/// Encoded deltas of every anchor: `bbox_weights` 1 on the 1 % positives (all 4 coordinates).
fn anchor_deltas(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    let f32s = (Kind::Float, device);
    let positive = Tensor::f_rand([n, 1], f32s)?.f_lt(POSITIVE_FRACTION)?;
    let target = Tensor::f_randn([n, c], f32s)?.f_mul_scalar(0.5)?;
    let pred = target
        .f_add(&Tensor::f_randn([n, c], f32s)?.f_mul_scalar(0.2)?)?
        .f_to_kind(kind)?
        .set_requires_grad(true);
    Ok(Inputs {
        kind,
        pred,
        target: TargetData::One(target.f_to_kind(kind)?),
        avg_factor: Some(positive.f_sum(Kind::Float)?.f_clamp_min(1.0)?),
        weight: Some(
            positive
                .f_expand([n, c], false)?
                .f_to_kind(kind)?
                .f_contiguous()?,
        ),
    })
}

/// GHM-R's sampled anchors: deltas and label weights 1 on the sampled ones (half of them).
fn ghm_deltas(n: i64, c: i64, kind: Kind, device: Device) -> Result<Inputs> {
    let f32s = (Kind::Float, device);
    let target = Tensor::f_randn([n, c], f32s)?.f_mul_scalar(0.5)?;
    let pred = target
        .f_add(&Tensor::f_randn([n, c], f32s)?.f_mul_scalar(0.1)?)?
        .f_to_kind(kind)?
        .set_requires_grad(true);
    let sampled = Tensor::f_rand([n, 1], f32s)?.f_lt(0.5)?;
    Ok(Inputs {
        kind,
        pred,
        target: TargetData::One(target.f_to_kind(kind)?),
        avg_factor: None,
        weight: Some(
            sampled
                .f_expand([n, c], false)?
                .f_to_kind(Kind::Float)?
                .f_contiguous()?,
        ),
    })
}
