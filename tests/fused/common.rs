//! What the tests of the fused kernels share: the named loss variants, their random inputs and
//! weights, and `check_variant`, which runs one variant over every shape, layout, weight and
//! reduction and compares the fused loss and gradients with the unfused composition in float64.

use tch::{Device, Kind, Tensor};
use tch_detloss::golden::rel_err;
use tch_detloss::losses::ae::ImageMatch;
use tch_detloss::{registry, AvgFactor, LossArgs, Reduction, Target};

/// How a variant's target looks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tgt {
    /// Class indices in [0, C], C = background.
    Labels,
    /// (N, C): mostly zeros, some soft positives and some exact ones.
    Dense,
    /// (labels, scores).
    LabelsScores,
    /// Softmax class indices in [0, C), about 15% equal to the given ignore_index.
    ClassIdx(i64),
    /// Class indices in [-1, C], some equal to the given ignore_index (sigmoid CE).
    LabelsIgnore(i64),
    /// (N, C) 0/1/soft targets with some entries -1 or the given ignore_index (sigmoid CE).
    DenseIgnore(i64),
    /// pred (N,) with a target (N,) in [0, 1] (ATSS's centerness); C is unused.
    Column,
    /// One distance per row in [0, C - 1), some of them integers (DFL).
    Distances,
    /// (N, C) binary targets (GHMC).
    Binary,
    /// (N, K) regression deltas and targets, about 10% of them equal (a gradient at exactly 0).
    Deltas,
    /// GHM-R's (N, K) deltas, whose gradient norms keep away from the bin edges of `bins`.
    GhmDeltas,
    /// (N, 4) xyxy boxes: close, identical, disjoint, touching and zero-area pairs.
    Boxes,
    /// Labels in [0, C - k] for pred (N, C) of C - k classes plus k more columns (Seesaw's two
    /// objectness logits, EQLv2's one); C - k is background. `CLASSES_BELOW` in the config is
    /// C - k.
    LabelsBelow(i64),
    /// MultiPosCrossEntropyLoss: (N, C) 0/1 match labels, as `Binary`; its loss expands every
    /// row to C^2 pairs, so the LVIS-sized shape (C = 1204) is left out.
    Pairs,
    /// TripletLoss: pred (N, C) embeddings and ids (N,), each id on at least two samples (a
    /// sample that is its own only positive has a distance at the 1e-12 clamp, whose gradient
    /// is rounding noise below float64).
    Ids,
    /// AssociativeEmbeddingLoss: pred and target (B, D, H, W) corner embeddings, B = min(N, 4)
    /// images, D = 1 + C % 2, with 0 to 4 objects per image at random cells (`Inputs::matches`).
    Corners,
}

/// One loss variant under test: a config dict and the target it takes.
pub struct Variant {
    pub name: &'static str,
    /// The config dict; `CLASS_WEIGHT` stands for a list of C per-class weights.
    pub config: &'static str,
    pub tgt: Tgt,
    /// pred holds probabilities.
    pub prob: bool,
    /// GHM: the bin count, whose edges the logits are kept away from (the float32 kernels and
    /// the float64 reference would bin a value next to an edge differently).
    pub bins: i64,
    /// The reference computes in float32 as MMDetection does (its BCE on `target.float()`), so
    /// it is only float32-accurate in float64.
    pub ref_f32: bool,
    /// The loss is composed of stock ops (its `forward` is `forward_unfused`): in float16 and
    /// bfloat16 its accuracy is torch's own, so there both paths are compared with each other
    /// in that dtype rather than with float64.
    pub stock: bool,
    /// The loss reads the device back or copies host data to it, as MMDetection's does
    /// (BoundedIoULoss's zero-weight short-cut, L2Loss's counts,
    /// TripletLoss's negatives check, AssociativeEmbeddingLoss's match): left out of the GPU's
    /// sync-free check.
    #[cfg_attr(not(feature = "gpu-tests"), allow(dead_code))]
    pub host_reads: bool,
}

const fn v(config: &'static str, tgt: Tgt) -> Variant {
    Variant {
        name: "",
        config,
        tgt,
        prob: false,
        bins: 0,
        ref_f32: false,
        stock: false,
        host_reads: false,
    }
}

/// A variant of a loss composed of stock ops.
const fn stock(config: &'static str, tgt: Tgt) -> Variant {
    Variant {
        stock: true,
        ..v(config, tgt)
    }
}

/// Defines `VARIANTS` from `name => Variant` rows, and `for_each_variant!(cb)`, which calls
/// `cb! { name ... }` with every row's name: the per-variant tests of the CPU matrix, the
/// emulated device and the GPU are generated from this one table, so a new loss is one row here
/// (and a `Tgt` where its target is new).
macro_rules! variant_table {
    ($d:tt $($name:ident => $v:expr,)*) => {
        pub const VARIANTS: &[Variant] = &[$(Variant { name: stringify!($name), ..$v }),*];

        macro_rules! for_each_variant {
            ($d cb:ident) => { $d cb! { $($name)* } };
        }
    };
}

variant_table! { $
    focal => v(r#"{"type": "FocalLoss"}"#, Tgt::Labels),
    focal_g1_5_a0_5 => v(r#"{"type": "FocalLoss", "gamma": 1.5, "alpha": 0.5}"#, Tgt::Labels),
    focal_g0 => v(r#"{"type": "FocalLoss", "gamma": 0.0}"#, Tgt::Labels),
    focal_dense_lw0_5 => v(r#"{"type": "FocalLoss", "gamma": 2.0, "loss_weight": 0.5}"#, Tgt::Dense),
    focal_activated => Variant {
        prob: true,
        ..v(r#"{"type": "FocalLoss", "activated": true}"#, Tgt::Labels)
    },
    focal_activated_dense_g1_5 => Variant {
        prob: true,
        ..v(r#"{"type": "FocalLoss", "activated": true, "gamma": 1.5}"#, Tgt::Dense)
    },
    qfl => v(r#"{"type": "QualityFocalLoss"}"#, Tgt::LabelsScores),
    qfl_dense_b1_lw2 => v(r#"{"type": "QualityFocalLoss", "beta": 1.0, "loss_weight": 2.0}"#, Tgt::Dense),
    qfl_activated => Variant {
        prob: true,
        ..v(r#"{"type": "QualityFocalLoss", "activated": true}"#, Tgt::LabelsScores)
    },
    qfl_activated_dense_b1_5 => Variant {
        prob: true,
        ..v(r#"{"type": "QualityFocalLoss", "activated": true, "beta": 1.5}"#, Tgt::Dense)
    },
    vfl => v(r#"{"type": "VarifocalLoss"}"#, Tgt::Dense),
    vfl_plain_g1_5_a0_5 => v(r#"{"type": "VarifocalLoss", "iou_weighted": false, "gamma": 1.5, "alpha": 0.5}"#, Tgt::Dense),
    ce_softmax => v(r#"{"type": "CrossEntropyLoss"}"#, Tgt::ClassIdx(-100)),
    ce_softmax_cw_ignore255_avgnonignore_lw2 => v(r#"{"type": "CrossEntropyLoss", "class_weight": CLASS_WEIGHT, "ignore_index": 255, "avg_non_ignore": true, "loss_weight": 2.0}"#, Tgt::ClassIdx(255)),
    ce_sigmoid_labels_ignore255_avgnonignore => Variant {
        ref_f32: true,
        ..v(r#"{"type": "CrossEntropyLoss", "use_sigmoid": true, "ignore_index": 255, "avg_non_ignore": true}"#, Tgt::LabelsIgnore(255))
    },
    ce_sigmoid_dense_cw => Variant {
        ref_f32: true,
        ..v(r#"{"type": "CrossEntropyLoss", "use_sigmoid": true, "class_weight": CLASS_WEIGHT}"#, Tgt::DenseIgnore(-100))
    },
    ce_sigmoid_column => Variant {
        ref_f32: true,
        ..v(r#"{"type": "CrossEntropyLoss", "use_sigmoid": true, "avg_non_ignore": true}"#, Tgt::Column)
    },
    focal_custom => v(r#"{"type": "FocalCustomLoss", "num_classes": NUM_CLASSES}"#, Tgt::Labels),
    focal_custom_g1_5_a0_5_lw2 => v(r#"{"type": "FocalCustomLoss", "num_classes": NUM_CLASSES, "gamma": 1.5, "alpha": 0.5, "loss_weight": 2.0}"#, Tgt::Labels),
    ce_custom_softmax_ignore255 => v(r#"{"type": "CrossEntropyCustomLoss", "num_classes": NUM_CLASSES, "ignore_index": 255, "avg_non_ignore": true}"#, Tgt::ClassIdx(255)),
    ce_custom_sigmoid_cw => Variant {
        ref_f32: true,
        ..v(r#"{"type": "CrossEntropyCustomLoss", "num_classes": NUM_CLASSES, "use_sigmoid": true, "class_weight": CLASS_WEIGHT}"#, Tgt::LabelsIgnore(-100))
    },
    gaussian_focal => Variant {
        prob: true,
        ..v(r#"{"type": "GaussianFocalLoss"}"#, Tgt::Dense)
    },
    gaussian_focal_a3_g2_pw2_nw0_5_lw0_7 => Variant {
        prob: true,
        ..v(r#"{"type": "GaussianFocalLoss", "alpha": 3.0, "gamma": 2.0, "pos_weight": 2.0, "neg_weight": 0.5, "loss_weight": 0.7}"#, Tgt::Dense)
    },
    kd_t10 => v(r#"{"type": "KnowledgeDistillationKLDivLoss"}"#, Tgt::Dense),
    kd_t2_5_lw0_5 => v(r#"{"type": "KnowledgeDistillationKLDivLoss", "T": 2.5, "loss_weight": 0.5}"#, Tgt::Dense),
    dice => stock(r#"{"type": "DiceLoss"}"#, Tgt::Dense),
    dice_naive_eps1_lw2 => stock(r#"{"type": "DiceLoss", "naive_dice": true, "eps": 1.0, "loss_weight": 2.0}"#, Tgt::Dense),
    seesaw => v(r#"{"type": "SeesawLoss", "num_classes": CLASSES_BELOW}"#, Tgt::LabelsBelow(2)),
    seesaw_p1_5_q1_eps0_1_lw2_sum => v(r#"{"type": "SeesawLoss", "num_classes": CLASSES_BELOW, "p": 1.5, "q": 1.0, "eps": 0.1, "loss_weight": 2.0, "reduction": "sum", "return_dict": false}"#, Tgt::LabelsBelow(2)),
    eqlv2 => stock(r#"{"type": "EQLV2Loss", "num_classes": CLASSES_BELOW}"#, Tgt::LabelsBelow(1)),
    eqlv2_mu0_5_a2_g6_lw2 => stock(r#"{"type": "EQLV2Loss", "num_classes": CLASSES_BELOW, "mu": 0.5, "alpha": 2.0, "gamma": 6, "loss_weight": 2.0}"#, Tgt::LabelsBelow(1)),
    multipos_ce => stock(r#"{"type": "MultiPosCrossEntropyLoss"}"#, Tgt::Pairs),
    multipos_ce_lw2_sum => stock(r#"{"type": "MultiPosCrossEntropyLoss", "loss_weight": 2.0, "reduction": "sum"}"#, Tgt::Pairs),
    l2 => Variant {
        prob: true,
        host_reads: true,
        ..stock(r#"{"type": "L2Loss"}"#, Tgt::Binary)
    },
    l2_ub3_hard_lw0_5 => Variant {
        prob: true,
        host_reads: true,
        ..stock(r#"{"type": "L2Loss", "neg_pos_ub": 3, "hard_mining": true, "loss_weight": 0.5}"#, Tgt::Binary)
    },
    margin_l2_ub2_hard => Variant {
        prob: true,
        host_reads: true,
        ..stock(r#"{"type": "MarginL2Loss", "neg_pos_ub": 2, "hard_mining": true}"#, Tgt::Binary)
    },
    // It reads back whether every sample has a negative (MMDetection's min() of nothing raises).
    triplet => Variant {
        host_reads: true,
        ..stock(r#"{"type": "TripletLoss"}"#, Tgt::Ids)
    },
    triplet_margin1_lw2 => Variant {
        host_reads: true,
        ..stock(r#"{"type": "TripletLoss", "margin": 1.0, "loss_weight": 2.0}"#, Tgt::Ids)
    },
    // Its match is host data, copied to the device on each call.
    ae => Variant {
        host_reads: true,
        ..stock(r#"{"type": "AssociativeEmbeddingLoss"}"#, Tgt::Corners)
    },
    ae_pull1_push0_5 => Variant {
        host_reads: true,
        ..stock(r#"{"type": "AssociativeEmbeddingLoss", "pull_weight": 1.0, "push_weight": 0.5}"#, Tgt::Corners)
    },
    dfl => v(r#"{"type": "DistributionFocalLoss"}"#, Tgt::Distances),
    dfl_lw0_25 => v(r#"{"type": "DistributionFocalLoss", "loss_weight": 0.25, "reduction": "sum"}"#, Tgt::Distances),
    ghmc => Variant {
        bins: 10,
        ref_f32: true,
        ..v(r#"{"type": "GHMC"}"#, Tgt::Labels)
    },
    ghmc_bins30_mom0_75_dense => Variant {
        bins: 30,
        ref_f32: true,
        ..v(r#"{"type": "GHMC", "bins": 30, "momentum": 0.75, "loss_weight": 2.0}"#, Tgt::Binary)
    },
    l1 => v(r#"{"type": "L1Loss"}"#, Tgt::Deltas),
    smooth_l1_b0_11_lw2 => v(r#"{"type": "SmoothL1Loss", "beta": 0.11, "loss_weight": 2.0}"#, Tgt::Deltas),
    balanced_l1 => v(r#"{"type": "BalancedL1Loss"}"#, Tgt::Deltas),
    mse => v(r#"{"type": "MSELoss"}"#, Tgt::Deltas),
    mse_sum_lw0_5 => v(r#"{"type": "MSELoss", "reduction": "sum", "loss_weight": 0.5}"#, Tgt::Deltas),
    balanced_l1_a0_3_g2_b0_5 => v(r#"{"type": "BalancedL1Loss", "alpha": 0.3, "gamma": 2.0, "beta": 0.5}"#, Tgt::Deltas),
    iou_log => v(r#"{"type": "IoULoss"}"#, Tgt::Boxes),
    iou_linear => v(r#"{"type": "IoULoss", "mode": "linear"}"#, Tgt::Boxes),
    iou_square_eps0_01 => v(r#"{"type": "IoULoss", "mode": "square", "eps": 0.01}"#, Tgt::Boxes),
    giou => v(r#"{"type": "GIoULoss"}"#, Tgt::Boxes),
    giou_eps0_01_lw5 => v(r#"{"type": "GIoULoss", "eps": 0.01, "loss_weight": 5.0}"#, Tgt::Boxes),
    diou => v(r#"{"type": "DIoULoss"}"#, Tgt::Boxes),
    ciou => v(r#"{"type": "CIoULoss"}"#, Tgt::Boxes),
    ciou_eps0_01 => v(r#"{"type": "CIoULoss", "eps": 0.01}"#, Tgt::Boxes),
    bounded_iou => Variant {
        host_reads: true,
        ..stock(r#"{"type": "BoundedIoULoss"}"#, Tgt::Boxes)
    },
    bounded_iou_b0_5_eps0_01_lw2 => Variant {
        host_reads: true,
        ..stock(r#"{"type": "BoundedIoULoss", "beta": 0.5, "eps": 0.01, "loss_weight": 2.0}"#, Tgt::Boxes)
    },
    eiou => v(r#"{"type": "EIoULoss"}"#, Tgt::Boxes),
    eiou_sp0_3_eps0_01_lw2 => v(r#"{"type": "EIoULoss", "smooth_point": 0.3, "eps": 0.01, "loss_weight": 2.0}"#, Tgt::Boxes),
    siou => v(r#"{"type": "SIoULoss"}"#, Tgt::Boxes),
    siou_neg_gamma_eps1e_3 => v(r#"{"type": "SIoULoss", "neg_gamma": true, "eps": 0.001}"#, Tgt::Boxes),
    // MMDetection's total is a float32 sum of the label weights.
    ghmr => Variant {
        bins: 10,
        ref_f32: true,
        ..v(r#"{"type": "GHMR"}"#, Tgt::GhmDeltas)
    },
    ghmr_mu0_1_bins5_mom0_7 => Variant {
        bins: 5,
        ref_f32: true,
        ..v(r#"{"type": "GHMR", "mu": 0.1, "bins": 5, "momentum": 0.7, "loss_weight": 2.0}"#, Tgt::GhmDeltas)
    },
}

/// MMDetection's default mu of the GHMR variants (`ghmr_mu0.1...` uses 0.1).
fn ghmr_mu(v: &Variant) -> f64 {
    if v.config.contains("\"mu\": 0.1") {
        0.1
    } else {
        0.02
    }
}

/// Random xyxy box pairs `(N, 4)` in float64: pred near target for most, and each of the cases
/// where the IoU family's gradient follows autograd's tie rules or a clamp: identical boxes,
/// disjoint ones, touching ones (pred's x1 on target's x2) and zero-area ones.
///
/// `identical: false` leaves identical pairs out: CIoULoss, as MMDetection computes it, is NaN
/// for them below float64 (the union's eps vanishes in float32, the IoU is 1 and its
/// `alpha = v / (1 - iou + v)` is 0 / 0), where the float64 reference is finite.
pub fn box_pairs(n: i64, identical: bool) -> (Tensor, Tensor) {
    let opts = (Kind::Double, Device::Cpu);
    // Coordinates on a 1/8 grid: exact in every dtype, so that ties survive the conversion.
    let grid = |t: Tensor| (t * 8.0).round() / 8.0;
    let lo = grid(Tensor::rand([n, 2], opts) * 20.0);
    let size = grid(Tensor::rand([n, 2], opts) * 10.0 + 0.5);
    let target = Tensor::cat(&[&lo, &(&lo + &size)], 1);
    let noise = grid(Tensor::randn([n, 4], opts) * 1.5);
    let mut pred = &target + noise;
    // Keep pred's boxes ordered (x1 <= x2, y1 <= y2).
    let (p_lo, p_hi) = (pred.narrow(1, 0, 2), pred.narrow(1, 2, 2));
    pred = Tensor::cat(&[p_lo.minimum(&p_hi), p_lo.maximum(&p_hi)], 1);
    let kind = Tensor::rand([n, 1], opts);
    let identical = kind.lt(if identical { 0.15 } else { 0.0 });
    let disjoint = kind.ge(0.15).logical_and(&kind.lt(0.25));
    let touching = kind.ge(0.25).logical_and(&kind.lt(0.3));
    let degenerate = kind.ge(0.3).logical_and(&kind.lt(0.35));
    pred = pred.where_self(&identical.logical_not(), &target);
    pred = pred.where_self(&disjoint.logical_not(), &(&target + 40.0));
    let shifted = Tensor::cat(
        &[
            target.narrow(1, 2, 1),
            target.narrow(1, 1, 1),
            target.narrow(1, 2, 1) + 3.0,
            target.narrow(1, 3, 1),
        ],
        1,
    );
    pred = pred.where_self(&touching.logical_not(), &shifted);
    let flat = Tensor::cat(
        &[
            pred.narrow(1, 0, 2),
            pred.narrow(1, 0, 1),
            pred.narrow(1, 3, 1),
        ],
        1,
    );
    pred = pred.where_self(&degenerate.logical_not(), &flat);
    (pred, target)
}

/// The column count of a variant's inputs: 4 for a target of one row per box or per box's
/// deltas, `c` otherwise.
pub fn columns(v: &Variant, c: i64) -> i64 {
    match v.tgt {
        Tgt::Deltas | Tgt::GhmDeltas | Tgt::Boxes => 4,
        _ => c,
    }
}

/// The config `type` of a variant.
pub fn variant_type(v: &Variant) -> String {
    let cfg: serde_json::Value =
        serde_json::from_str(&config(v, 1)).expect("a variant's config is JSON");
    cfg["type"].as_str().unwrap_or_default().to_string()
}

/// SIoU picks its angle's sine by `|s_cw| / sigma > sqrt(2) / 2`, and at `|s_cw| == |s_ch|` (on a
/// coordinate grid, common) that comparison falls either way by the last bit of the dtype, with
/// gradients of opposite sign on its two sides: pred is moved by 1/16 in x there (exact in every
/// dtype), so that below float64 the fused loss and the float64 reference take the same side.
fn off_siou_ties(pred: &Tensor, target: &Tensor) -> Tensor {
    let centre = |b: &Tensor, k: i64| b.select(1, k) + b.select(1, k + 2);
    let dx = (centre(target, 0) - centre(pred, 0)).abs();
    let dy = (centre(target, 1) - centre(pred, 1)).abs();
    let tie = (dx - dy).abs().lt(1e-9).unsqueeze(1).to_kind(Kind::Double);
    let shift = Tensor::from_slice(&[1.0 / 16.0, 0.0, 1.0 / 16.0, 0.0]).view([1, 4]);
    pred + tie * shift
}

/// The variant of that name.
pub fn variant(name: &str) -> &'static Variant {
    VARIANTS
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no variant {name}"))
}

/// The extra columns of a `Tgt::LabelsBelow` variant (0 for the others).
fn below(v: &Variant) -> i64 {
    match v.tgt {
        Tgt::LabelsBelow(k) => k,
        _ => 0,
    }
}

/// The variant's config for C classes (`CLASS_WEIGHT` and `NUM_CLASSES` filled in).
pub fn config(v: &Variant, c: i64) -> String {
    let cw: Vec<String> = (0..c)
        .map(|k| format!("{}", 0.5 + 0.25 * (k % 7) as f64))
        .collect();
    v.config
        .replace("CLASS_WEIGHT", &format!("[{}]", cw.join(", ")))
        .replace("NUM_CLASSES", &c.to_string())
        .replace("CLASSES_BELOW", &(c - below(v)).max(1).to_string())
}

pub struct Inputs {
    pub pred: Tensor,
    pub target: Tensor,
    pub scores: Option<Tensor>,
    /// AssociativeEmbeddingLoss's corner match.
    pub matches: Option<Vec<ImageMatch>>,
}

impl Inputs {
    pub fn target(&self) -> Target<'_> {
        match &self.scores {
            Some(s) => Target::LabelsScores {
                labels: &self.target,
                scores: s,
            },
            None => Target::Tensor(&self.target),
        }
    }

    /// `args` with this call's extra arguments (the corner match).
    pub fn args<'a>(&'a self, args: LossArgs<'a>) -> LossArgs<'a> {
        match &self.matches {
            Some(m) => args.corner_match(m),
            None => args,
        }
    }

    pub fn to_device(&self, device: Device) -> Inputs {
        Inputs {
            pred: self.pred.to_device(device),
            target: self.target.to_device(device),
            scores: self.scores.as_ref().map(|s| s.to_device(device)),
            matches: self.matches.clone(),
        }
    }

    /// pred (and floating targets and scores) in `kind`.
    pub fn to_kind(&self, kind: Kind) -> Inputs {
        let t = if self.target.is_floating_point() {
            self.target.to_kind(kind)
        } else {
            self.target.shallow_clone()
        };
        Inputs {
            pred: self.pred.to_kind(kind),
            target: t,
            scores: self.scores.as_ref().map(|s| s.to_kind(kind)),
            matches: self.matches.clone(),
        }
    }
}

/// Logits (in `kind`) whose sigmoid, and one minus it, lie at least 1e-4 from every GHM edge
/// `k / bins`: elements closer are replaced by 0.3.
fn away_from_edges(pred: Tensor, bins: i64) -> Tensor {
    let p = pred.to_kind(Kind::Double).sigmoid();
    let near = |g: &Tensor| {
        let s = g * bins as f64;
        (&s - s.round()).abs().lt(1e-4 * bins as f64)
    };
    let bad = near(&p).logical_or(&near(&(1.0 - &p)));
    pred.masked_fill(&bad, 0.3)
}

/// Random inputs of a variant. `pred` is built transposed (non-contiguous) when asked.
pub fn inputs(v: &Variant, n: i64, c: i64, kind: Kind, transposed: bool) -> Inputs {
    let opts = (Kind::Double, Device::Cpu);
    let mut logits = Tensor::randn([n, c], opts) * 2.5;
    if v.prob {
        logits = logits.sigmoid();
        if matches!(kind, Kind::Half | Kind::BFloat16) {
            // A half probability of exactly 0 or 1 has a BCE gradient of 1e12, beyond half's
            // range (as with stock torch); keep half inputs off the saturated ends.
            logits = logits.clamp(1e-3, 1.0 - 1e-3);
        }
    }
    let pred = if transposed {
        logits.t_copy().contiguous().t_()
    } else {
        logits
    };
    let mut pred = pred.to_kind(kind);
    if v.bins > 0 {
        pred = away_from_edges(pred, v.bins);
    }
    let labels = Tensor::randint(c + 1, [n], (Kind::Int64, Device::Cpu)); // c = background
    let some = |p: f64, shape: &[i64]| Tensor::rand(shape, opts).lt(p);
    let (mut target, scores) = match v.tgt {
        Tgt::Labels => (labels, None),
        Tgt::LabelsScores => (labels, Some(Tensor::rand([n], opts).to_kind(kind))),
        Tgt::Dense | Tgt::DenseIgnore(_) => {
            // Mostly zeros, some soft positives and some exact ones.
            let soft = Tensor::rand([n, c], opts);
            let keep = Tensor::rand([n, c], opts).gt(0.7).to_kind(Kind::Double);
            let ones = Tensor::rand([n, c], opts).gt(0.95).to_kind(Kind::Double);
            let mut t = (soft * keep).maximum(&ones);
            if let Tgt::DenseIgnore(ignore) = v.tgt {
                t = t
                    .masked_fill(&some(0.05, &[n, c]), -1.0)
                    .masked_fill(&some(0.05, &[n, c]), ignore as f64);
            }
            (t.to_kind(kind), None)
        }
        Tgt::ClassIdx(ignore) => {
            let l = Tensor::randint(c.max(1), [n], (Kind::Int64, Device::Cpu));
            (l.masked_fill(&some(0.15, &[n]), ignore), None)
        }
        Tgt::LabelsIgnore(ignore) => {
            let l =
                (labels - 1).clamp_min(-1) + Tensor::randint(2, [n], (Kind::Int64, Device::Cpu));
            (l.masked_fill(&some(0.1, &[n]), ignore), None)
        }
        Tgt::Column => {
            pred = pred.flatten(0, -1).narrow(0, 0, n);
            (Tensor::rand([n], opts).to_kind(kind), None)
        }
        Tgt::Distances => {
            // Below reg_max - 1, so that rounding to the dtype stays below reg_max.
            let top = ((c - 2) as f64).max(0.5);
            let d = Tensor::rand([n], opts) * top;
            // Some exact integers (the right bin's coefficient is then 0).
            let d = d.where_self(&some(0.8, &[n]), &d.floor());
            (d.to_kind(kind), None)
        }
        Tgt::Corners => (Tensor::new(), None),
        Tgt::Ids => (
            Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder((n / 2).max(1)),
            None,
        ),
        Tgt::LabelsBelow(k) => (
            Tensor::randint((c - k + 1).max(1), [n], (Kind::Int64, Device::Cpu)),
            None,
        ),
        Tgt::Binary | Tgt::Pairs => (Tensor::rand([n, c], opts).gt(0.8).to_kind(kind), None),
        Tgt::Deltas => {
            let t = Tensor::randn([n, c], opts) * 0.5;
            let p = &t + Tensor::randn([n, c], opts) * 0.4;
            // Some exact ties, where the gradient is torch's sign at 0.
            let p = t.where_self(&some(0.1, &[n, c]), &p).to_kind(kind);
            pred = if transposed {
                p.t_copy().contiguous().t_()
            } else {
                p
            };
            (t.to_kind(kind), None)
        }
        Tgt::GhmDeltas => {
            // Gradient norms g at least 0.2 bin widths from every edge, then d = mu g / sqrt(1 - g^2)
            // on small targets (|t| <= 0.01), so that the dtype's rounding cannot move a g across one.
            let bins = v.bins as f64;
            let mu = ghmr_mu(v);
            let bin =
                Tensor::randint(v.bins, [n, c], (Kind::Int64, Device::Cpu)).to_kind(Kind::Double);
            let g = (bin + Tensor::rand([n, c], opts) * 0.6 + 0.2) / bins;
            let g = g.clamp_max(0.97);
            let d = &g * mu / (-(&g * &g) + 1.0).sqrt();
            let sign = Tensor::rand([n, c], opts).gt(0.5).to_kind(Kind::Double) * 2.0 - 1.0;
            let t = (Tensor::rand([n, c], opts) - 0.5) * 0.02;
            let p = (&t + d * sign).to_kind(kind);
            pred = if transposed {
                p.t_copy().contiguous().t_()
            } else {
                p
            };
            (t.to_kind(kind), None)
        }
        Tgt::Boxes => {
            let (mut p, t) = box_pairs(n, kind == Kind::Double || !v.config.contains("CIoU"));
            if kind != Kind::Double && v.config.contains("SIoU") {
                p = off_siou_ties(&p, &t);
            }
            let p = p.to_kind(kind);
            pred = if transposed {
                p.t_copy().contiguous().t_()
            } else {
                p
            };
            (t.to_kind(kind), None)
        }
    };
    let matches = (v.tgt == Tgt::Corners).then(|| {
        let (b, d, h, w) = (n.min(4), 1 + c % 2, 5, 3 + c % 7);
        let p = Tensor::randn([b, d, w, h], opts).to_kind(kind);
        pred = if transposed {
            p.transpose(2, 3)
        } else {
            p.transpose(2, 3).contiguous()
        };
        target = Tensor::randn([b, d, h, w], opts).to_kind(kind);
        let cell = |hi: i64| Tensor::randint(hi, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]);
        (0..b)
            .map(|_| {
                (0..cell(5))
                    .map(|_| [[cell(h), cell(w)], [cell(h), cell(w)]])
                    .collect::<ImageMatch>()
            })
            .collect::<Vec<_>>()
    });
    Inputs {
        pred,
        target,
        scores,
        matches,
    }
}

/// Weight shapes each variant accepts, as MMDetection broadcasts them (GHMC's label weight, a
/// mask, is never absent).
pub fn weights(v: &Variant, n: i64, c: i64) -> Vec<(&'static str, Option<Tensor>)> {
    let w = |shape: &[i64]| Some(Tensor::rand(shape, (Kind::Double, Device::Cpu)) + 0.25);
    let mask = |shape: &[i64]| {
        let m = Tensor::rand(shape, (Kind::Double, Device::Cpu)).gt(0.2);
        Some((Tensor::rand(shape, (Kind::Double, Device::Cpu)) + 0.25) * m)
    };
    let ty = v.config;
    let mut out = vec![("none", None)];
    let zeros = |shape: &[i64]| Some(Tensor::zeros(shape, (Kind::Double, Device::Cpu)));
    match v.tgt {
        Tgt::GhmDeltas => {
            out.clear();
            out.push(("(N,K) mask", mask(&[n, c])));
            out.push(("(N,1) mask", mask(&[n, 1])));
        }
        Tgt::Deltas => {
            out.push(("(N,K)", w(&[n, c])));
            out.push(("(N,1)", w(&[n, 1])));
            out.push(("(K,)", w(&[c])));
            out.push(("(N,K) mask", mask(&[n, c])));
            // MMDetection's zero-weight short-cut (L1, SmoothL1) or an error (BalancedL1).
            out.push(("(N,K) zeros", zeros(&[n, c])));
            out.push(("(N,) zeros", zeros(&[n])));
        }
        Tgt::Boxes => {
            out.push(("(N,)", w(&[n])));
            out.push(("(N,4)", w(&[n, 4])));
            out.push(("(N,) mask", mask(&[n])));
            out.push(("(N,) zeros", zeros(&[n])));
            out.push(("(N,4) zeros", zeros(&[n, 4])));
        }
        _ if ty.contains("GHMC") => {
            out.clear();
            if v.tgt == Tgt::Labels {
                out.push(("(N,) mask", mask(&[n])));
            } else {
                out.push(("(N,C) mask", mask(&[n, c])));
                out.push(("(N,1) mask", mask(&[n, 1])));
            }
        }
        // A loss per sample.
        _ if ty.contains("KnowledgeDistillation")
            || ty.contains("DiceLoss")
            || ty.contains("Seesaw") =>
        {
            out.push(("(N,)", w(&[n])));
        }
        _ if ty.contains("\"FocalLoss\"") || ty.contains("\"FocalCustomLoss\"") => {
            out.push(("(N,)", w(&[n])));
            out.push(("(N*C,)", w(&[n * c])));
            out.push(("(N,C)", w(&[n, c])));
            // A transposed (non-contiguous) (N, C) weight.
            out.push(("(N,C)^T", w(&[c, n]).map(|t| t.transpose(0, 1))));
        }
        Tgt::LabelsScores | Tgt::ClassIdx(_) | Tgt::Distances => {
            out.push(("(N,)", w(&[n])));
            out.push(("()", w(&[])));
        }
        _ if ty.contains("QualityFocalLoss") => {
            out.push(("(N,)", w(&[n])));
            out.push(("()", w(&[])));
        }
        Tgt::LabelsIgnore(_) => {
            out.push(("(N,)", w(&[n])));
            out.push(("(N,1)", w(&[n, 1])));
        }
        Tgt::Column => out.push(("(N,)", w(&[n]))),
        _ => {
            out.push(("(N,C)", w(&[n, c])));
            out.push(("(C,)", w(&[c])));
            out.push(("(N,1)", w(&[n, 1])));
        }
    }
    out
}

/// Relative tolerance of a dtype's fused result against the float64 reference.
pub fn tolerance(kind: Kind) -> f64 {
    match kind {
        Kind::Double => 1e-10,
        Kind::Float => 2e-5,
        Kind::Half => 4e-3,
        _ => 3e-2, // bfloat16: 8 bits of mantissa
    }
}

/// Whether `got` matches the float64 `want` to the dtype's precision: its relative tolerance of
/// `want`'s largest magnitude, plus, for float16, the spacing of its subnormals (2^-24), which
/// is all a float16 gradient of a mean over many elements can resolve.
pub fn assert_close(got: &Tensor, want: &Tensor, kind: Kind, what: &str) {
    assert_close_tol(got, want, kind, tolerance(kind), what)
}

pub fn assert_close_tol(got: &Tensor, want: &Tensor, kind: Kind, tol: f64, what: &str) {
    let got = got.to_device(Device::Cpu);
    let err = rel_err(&got, want).unwrap_or_else(|e| panic!("{what}: {e}"));
    let scale = if want.numel() == 0 {
        1.0
    } else {
        want.abs()
            .nan_to_num(0.0, None, None)
            .max()
            .double_value(&[])
    };
    let quantum = if kind == Kind::Half {
        2f64.powi(-24)
    } else {
        0.0
    };
    let allowed = tol + quantum / scale.max(f64::MIN_POSITIVE);
    // Below 1e-4 a value of these O(1) losses is rounding noise (a box whose exact gradient is 0
    // gets 1e-16 from one op order and 0 from another): compared against 1e-4 instead.
    let err = err * scale / scale.max(1e-4);
    assert!(
        err <= allowed,
        "{what}: error {err:e} of the largest magnitude {scale:e} > {allowed:e}"
    );
}

/// Empty, single-class, odd (vector tails), a row longer than a block, many rows, and over a
/// thousand classes (an LVIS-sized softmax).
pub const SHAPES: &[(i64, i64)] = &[(0, 5), (7, 1), (37, 13), (3, 300), (257, 80), (5, 1204)];
/// Boxes: none, one, odd counts, more than a block.
pub const BOX_SHAPES: &[(i64, i64)] = &[(0, 4), (1, 4), (37, 4), (300, 4), (2053, 4)];
pub const REDUCTIONS: &[(&str, Option<Reduction>, Option<f64>, bool)] = &[
    ("none", Some(Reduction::None), None, false),
    ("mean", Some(Reduction::Mean), None, false),
    ("sum", Some(Reduction::Sum), None, false),
    ("mean/avg", Some(Reduction::Mean), Some(13.5), false),
    ("mean/avg-tensor", Some(Reduction::Mean), Some(7.25), true),
    ("none/avg", Some(Reduction::None), Some(3.0), false),
    ("config", None, None, false),
];

pub fn call_args(
    w: Option<&Tensor>,
    red: Option<Reduction>,
    avg: Option<f64>,
    avg_tensor: bool,
    k: Kind,
) -> LossArgs<'_> {
    let mut a = LossArgs::new();
    if let Some(w) = w {
        a = a.weight(w);
    }
    if let Some(r) = red {
        a = a.reduction(r);
    }
    match (avg, avg_tensor) {
        (Some(v), false) => a.avg_factor(v),
        (Some(v), true) => a.avg_factor(AvgFactor::Tensor(Tensor::from(v).to_kind(k))),
        _ => a,
    }
}

/// The global RNG is shared by the parallel tests: a test holds this while it draws inputs so
/// that each test sees the same inputs on every run.
pub static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs every shape, layout, weight and reduction of one variant on `device` and compares the
/// fused loss and both gradient paths with the unfused composition in float64 on the CPU.
pub fn check_variant(name: &str, kind: Kind, device: Device) {
    let _rng = rng_lock();
    let v = variant(name);
    tch::manual_seed(name.len() as i64 * 31 + kind as i64);
    if v.stock && matches!(kind, Kind::Half | Kind::BFloat16) {
        return check_stock_half(v, kind, device);
    }
    // The reference's own precision bounds the comparison.
    let tol = if v.ref_f32 {
        tolerance(kind).max(tolerance(Kind::Float))
    } else {
        tolerance(kind)
    };
    let mut checked = 0;
    let shapes = if v.tgt == Tgt::Boxes {
        BOX_SHAPES
    } else {
        SHAPES
    };
    for &(n, c) in shapes {
        if (v.tgt == Tgt::Distances && c < 2) || c <= below(v) || (v.tgt == Tgt::Pairs && c > 1000)
        {
            continue; // reg_max = 0: no distance is in range
        }
        let config = config(v, c);
        for transposed in [false, true] {
            // One loss object per path, called in lockstep (GHM's momentum state).
            let loss = registry::build_str(&config).unwrap();
            let reference = registry::build_str(&config).unwrap();
            let inp = inputs(v, n, c, kind, transposed);
            let on_device = inp.to_device(device);
            for (wname, weight) in weights(v, n, c) {
                for &(rname, red, avg, avg_tensor) in REDUCTIONS {
                    let ctx = format!("{name} {kind:?} {device:?} [{n}, {c}] transposed={transposed} weight={wname} {rname}");
                    let weight_k = weight.as_ref().map(|w| w.to_kind(kind));
                    let weight_d = weight_k.as_ref().map(|w| w.to_device(device));

                    // Fused, in the input dtype, on the device.
                    let pred = on_device.pred.detach().set_requires_grad(true);
                    let mut args = call_args(weight_d.as_ref(), red, avg, avg_tensor, kind);
                    if let Some(AvgFactor::Tensor(t)) = &args.avg_factor {
                        args.avg_factor = Some(AvgFactor::Tensor(t.to_device(device)));
                    }
                    let fused = loss.forward(&pred, on_device.target(), &on_device.args(args));

                    // Unfused, in float64 on the same values, on the CPU.
                    let pred64 = inp
                        .pred
                        .to_kind(Kind::Double)
                        .detach()
                        .set_requires_grad(true);
                    let inp64 = inp.to_kind(Kind::Double);
                    let w64 = weight_k.as_ref().map(|w| w.to_kind(Kind::Double));
                    let want = reference.forward_unfused(
                        &pred64,
                        inp64.target(),
                        &inp64.args(call_args(w64.as_ref(), red, avg, avg_tensor, Kind::Double)),
                    );
                    let (out, want) = match (fused, want) {
                        (Ok(o), Ok(w)) => (o, w),
                        (Err(a), Err(b)) => {
                            // Both reject it (GHM's 'sum', a weight that does not broadcast),
                            // with the same reason.
                            // Up to torch's backtrace, whose frames differ from call to call.
                            let (a, b) = (format!("{a:#}"), format!("{b:#}"));
                            let (a, b) = (
                                a.lines().next().unwrap_or(""),
                                b.lines().next().unwrap_or(""),
                            );
                            assert!(
                                a == b
                                    || (a.contains("avg_factor can not be used")
                                        && b.contains("avg_factor can not be used")),
                                "{ctx}: {a} / {b}"
                            );
                            continue;
                        }
                        (a, b) => panic!("{ctx}: fused {:?}, unfused {:?}", a.err(), b.err()),
                    };
                    let upstream =
                        Tensor::rand(out.size().as_slice(), (Kind::Double, Device::Cpu)) + 0.5;
                    let objective =
                        (&out * upstream.to_kind(out.kind()).to_device(device)).sum(Kind::Double);
                    // On the CPU the first backward uses the gradient the forward pass wrote and the
                    // second (graph retained) recomputes it in the backward kernel; on CUDA both
                    // recompute. All must be right.
                    let first =
                        Tensor::run_backward(&[&objective], &[&pred], true, false).remove(0);
                    let second =
                        Tensor::run_backward(&[&objective], &[&pred], false, false).remove(0);
                    (&want.to_kind(Kind::Double) * &upstream)
                        .sum(Kind::Double)
                        .backward();

                    assert_eq!(out.kind(), kind, "{ctx}: output dtype");
                    assert_eq!(out.device(), device, "{ctx}: output device");
                    let want = want.to_kind(Kind::Double);
                    assert_close_tol(&out, &want, kind, tol, &format!("{ctx}: loss"));
                    for (which, g) in [("first", first), ("second", second)] {
                        assert_close_tol(
                            &g,
                            &pred64.grad(),
                            kind,
                            tol,
                            &format!("{ctx}: {which} grad"),
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    // TripletLoss and AssociativeEmbeddingLoss take no call arguments: one reduction of each
    // shape and layout runs.
    let least = if matches!(v.tgt, Tgt::Ids | Tgt::Corners) {
        2 * 2
    } else {
        2 * REDUCTIONS.len() * 2
    };
    assert!(checked >= least, "only {checked} combinations ran");
}

/// A stock-op variant in float16 or bfloat16: `forward` and `forward_unfused` give the same loss
/// and gradient, bit for bit, on `device`, in the dtype torch's composition gives, for every
/// shape and reduction.
fn check_stock_half(v: &Variant, kind: Kind, device: Device) {
    let shapes = if v.tgt == Tgt::Boxes {
        BOX_SHAPES
    } else {
        SHAPES
    };
    let mut checked = 0;
    for &(n, c) in shapes {
        if c <= below(v) || (v.tgt == Tgt::Pairs && c > 1000) {
            continue;
        }
        // One loss object per path, called in lockstep (Seesaw's class counts).
        let fused_loss = registry::build_str(&config(v, c)).unwrap();
        let unfused_loss = registry::build_str(&config(v, c)).unwrap();
        let inp = inputs(v, n, c, kind, false).to_device(device);
        for &(rname, red, avg, avg_tensor) in REDUCTIONS {
            let ctx = format!("{} {kind:?} {device:?} [{n}, {c}] {rname}", v.name);
            let mut args = call_args(None, red, avg, avg_tensor, kind);
            if let Some(AvgFactor::Tensor(t)) = &args.avg_factor {
                args.avg_factor = Some(AvgFactor::Tensor(t.to_device(device)));
            }
            let run = |fused: bool| {
                let pred = inp.pred.detach().set_requires_grad(true);
                let args = inp.args(args.clone());
                let out = if fused {
                    fused_loss.forward(&pred, inp.target(), &args)
                } else {
                    unfused_loss.forward_unfused(&pred, inp.target(), &args)
                };
                out.map(|o| {
                    let g = Tensor::run_backward(&[&o.sum(Kind::Double)], &[&pred], false, false)
                        .remove(0);
                    (o, g)
                })
                .map_err(|e| format!("{e:#}"))
            };
            match (run(true), run(false)) {
                (Ok((a, ga)), Ok((b, gb))) => {
                    assert!(same_values(&a, &b), "{ctx}: loss");
                    assert!(same_values(&ga, &gb), "{ctx}: grad");
                    checked += 1;
                }
                // The same error, up to torch's backtrace.
                (Err(a), Err(b)) => assert_eq!(a.lines().next(), b.lines().next(), "{ctx}"),
                (a, b) => panic!("{ctx}: fused {:?}, unfused {:?}", a.err(), b.err()),
            }
        }
    }
    let least = if matches!(v.tgt, Tgt::Ids | Tgt::Corners) {
        2
    } else {
        REDUCTIONS.len()
    };
    assert!(checked >= least, "only {checked} combinations ran");
}

/// Equal values, NaN where the other has NaN.
fn same_values(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size()
        && a.kind() == b.kind()
        && a.eq_tensor(b)
            .logical_or(&a.isnan().logical_and(&b.isnan()))
            .all()
            .int64_value(&[])
            == 1
}
