//! Bad and unusual inputs: every registered loss (in its first variant of `common::VARIANTS`), fused and unfused, returns an error (never a
//! panic) for every layout, kind and dimension count in every argument position; the two paths
//! agree on what they accept; the autograd node keeps autograd's guarantees (version counters,
//! double backward); messages name what the user passed.

use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::{Device, Kind, Layout, Tensor};
use tch_detloss::losses::ae::ImageMatch;
use tch_detloss::losses::{FocalLoss, QualityFocalLoss};
use tch_detloss::testing::meta_like;
use tch_detloss::{registry, AvgFactor, Loss, LossArgs, Reduction, Target};

use crate::common::{columns, config, inputs, rng_lock, variant_type, weights, VARIANTS};

/// One call's tensors: `target` is class indices, a dense target, boxes or QFL's labels.
struct Call {
    pred: Tensor,
    target: Tensor,
    scores: Option<Tensor>,
    weight: Option<Tensor>,
    avg_factor: Option<Tensor>,
    matches: Option<Vec<ImageMatch>>,
}

const N: i64 = 6;
const C: i64 = 4;

/// A valid call of a registered loss: the first variant of `common::VARIANTS` of its type, with
/// that variant's inputs and the first of its weights that the loss takes. Every built-in type must have one, which is what
/// makes a new loss inherit every check below.
fn valid_call(ty: &str) -> (String, Call) {
    let v = VARIANTS
        .iter()
        .find(|v| variant_type(v) == ty)
        .unwrap_or_else(|| panic!("{ty} has no variant in tests/fused/common.rs"));
    tch::manual_seed(3);
    let c = columns(v, C);
    let inp = inputs(v, N, c, Kind::Float, false);
    let config = config(v, c);
    let loss = registry::build_str(&config).unwrap();
    let mut call = Call {
        pred: inp.pred,
        target: inp.target,
        scores: inp.scores,
        weight: None,
        avg_factor: Some(Tensor::from(3.0f32)),
        matches: inp.matches,
    };
    // TripletLoss and AssociativeEmbeddingLoss take no avg_factor, as MMDetection's.
    if !matches!(self::call(loss.as_ref(), &call, false), Ok(Ok(_))) {
        call.avg_factor = None;
    }
    // The first of the variant's weights that the loss takes (BoundedIoULoss's (N,) is not).
    call.weight = weights(v, N, c)
        .into_iter()
        .filter_map(|(_, w)| w.map(|w| w.to_kind(Kind::Float)))
        .find(|w| {
            let with_w = Call {
                weight: Some(w.shallow_clone()),
                ..with(&call, Pos::Pred, call.pred.shallow_clone())
            };
            matches!(self::call(loss.as_ref(), &with_w, false), Ok(Ok(_)))
        });
    (config, call)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pos {
    Pred,
    Target,
    Scores,
    Weight,
    AvgFactor,
}

impl Pos {
    /// The argument's name in error messages.
    fn word(self, has_scores: bool) -> &'static str {
        match self {
            Pos::Pred => "pred",
            Pos::Target if has_scores => "labels",
            Pos::Target => "target",
            Pos::Scores => "scores",
            Pos::Weight => "weight",
            Pos::AvgFactor => "avg_factor",
        }
    }
}

/// What a call returned, or the panic message.
type Outcome = Result<Result<Tensor, String>, String>;

fn call(loss: &dyn Loss, c: &Call, fused: bool) -> Outcome {
    catch_unwind(AssertUnwindSafe(|| {
        let target = match &c.scores {
            Some(s) => Target::LabelsScores {
                labels: &c.target,
                scores: s,
            },
            None => Target::Tensor(&c.target),
        };
        let mut args = LossArgs::new();
        if let Some(a) = &c.avg_factor {
            args = args.avg_factor(AvgFactor::Tensor(a.shallow_clone()));
        }
        if let Some(w) = &c.weight {
            args = args.weight(w);
        }
        if let Some(m) = &c.matches {
            args = args.corner_match(m);
        }
        let r = if fused {
            loss.forward(&c.pred, target, &args)
        } else {
            loss.forward_unfused(&c.pred, target, &args)
        };
        r.map_err(|e| format!("{e:#}"))
    }))
    .map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// Every way to pass a tensor that our kernels cannot read as it is, with the word the error
/// must contain.
fn unreadable(t: &Tensor) -> Vec<(String, Tensor, &'static str)> {
    let mut v = vec![
        ("undefined".to_string(), Tensor::new(), "undefined"),
        ("meta".to_string(), meta_like(t).unwrap(), "meta"),
    ];
    let f = t.to_kind(Kind::Float);
    if let Ok(s) = f.f_to_sparse(Some(Layout::Sparse), None::<&[i64]>, None) {
        v.push(("sparse COO".into(), s, "layout"));
    }
    if t.dim() == 2 {
        v.push((
            "sparse CSR".into(),
            f.f_to_sparse_csr(None).unwrap(),
            "layout",
        ));
    }
    if t.dim() >= 1 {
        v.push((
            "mkldnn".into(),
            f.f_to_mkldnn(Kind::Float).unwrap(),
            "layout",
        ));
    }
    v.push((
        "quantized".into(),
        f.f_quantize_per_tensor(0.1, 0, Kind::QInt8).unwrap(),
        "quantized",
    ));
    v
}

const KINDS: &[Kind] = &[
    Kind::Uint8,
    Kind::Int8,
    Kind::Int16,
    Kind::Int,
    Kind::Int64,
    Kind::Half,
    Kind::Float,
    Kind::Double,
    Kind::ComplexHalf,
    Kind::ComplexFloat,
    Kind::ComplexDouble,
    Kind::Bool,
    Kind::BFloat16,
    Kind::Float8e5m2,
    Kind::Float8e4m3fn,
];

fn with(c: &Call, pos: Pos, t: Tensor) -> Call {
    Call {
        pred: if pos == Pos::Pred {
            t.shallow_clone()
        } else {
            c.pred.shallow_clone()
        },
        target: if pos == Pos::Target {
            t.shallow_clone()
        } else {
            c.target.shallow_clone()
        },
        scores: match (&c.scores, pos) {
            (Some(_), Pos::Scores) => Some(t.shallow_clone()),
            (s, _) => s.as_ref().map(Tensor::shallow_clone),
        },
        weight: if pos == Pos::Weight {
            Some(t.shallow_clone())
        } else {
            c.weight.as_ref().map(Tensor::shallow_clone)
        },
        avg_factor: if pos == Pos::AvgFactor {
            Some(t)
        } else {
            c.avg_factor.as_ref().map(Tensor::shallow_clone)
        },
        matches: c.matches.clone(),
    }
}

fn original(c: &Call, pos: Pos) -> &Tensor {
    match pos {
        Pos::Pred => &c.pred,
        Pos::Target => &c.target,
        Pos::Scores => c.scores.as_ref().unwrap(),
        Pos::Weight => c.weight.as_ref().unwrap(),
        Pos::AvgFactor => c.avg_factor.as_ref().unwrap(),
    }
}

/// Layouts × kinds × 0-dim × argument positions × every registered loss, fused and unfused.
#[test]
fn every_layout_kind_and_position_is_an_error_or_a_result_never_a_panic() {
    let mut problems = Vec::new();
    let mut calls = 0;
    let _rng = rng_lock();
    for ty in registry::registered_types() {
        let (config, base) = valid_call(&ty);
        let loss = registry::build_str(&config).unwrap();
        for fused in [true, false] {
            assert!(
                matches!(call(loss.as_ref(), &base, fused), Ok(Ok(_))),
                "{ty}: the valid call fails"
            );
        }
        let has_scores = base.scores.is_some();
        for pos in [
            Pos::Pred,
            Pos::Target,
            Pos::Scores,
            Pos::Weight,
            Pos::AvgFactor,
        ] {
            if (pos == Pos::Scores && !has_scores)
                || (pos == Pos::Weight && base.weight.is_none())
                || (pos == Pos::AvgFactor && base.avg_factor.is_none())
            {
                continue;
            }
            let word = pos.word(has_scores);
            let t = original(&base, pos);
            let mut variants: Vec<(String, Tensor, Option<&str>)> = unreadable(t)
                .into_iter()
                .map(|(what, t, must)| (what, t, Some(must)))
                .collect();
            for &k in KINDS {
                variants.push((format!("{k:?}"), t.to_kind(k), None));
            }
            let zero_dim = if t.dim() == 0 {
                t.shallow_clone()
            } else {
                t.flatten(0, -1).get(0)
            };
            variants.push(("0-dim".into(), zero_dim, None));
            variants.push((
                "3-dim".into(),
                t.reshape([-1]).unsqueeze(0).unsqueeze(0),
                None,
            ));

            for (what, bad, must) in variants {
                let c = with(&base, pos, bad);
                let fused = call(loss.as_ref(), &c, true);
                let unfused = call(loss.as_ref(), &c, false);
                calls += 2;
                let ctx = format!("{ty} {word}={what}");
                for (path, r) in [("fused", &fused), ("unfused", &unfused)] {
                    match r {
                        Err(panic) => problems.push(format!("{ctx} {path}: panic {panic}")),
                        Ok(Err(msg)) => {
                            if !msg.contains(&ty) || !msg.contains(word) {
                                problems.push(format!(
                                    "{ctx} {path}: message does not name {ty} and {word}: {msg}"
                                ));
                            }
                            if let Some(m) = must {
                                if !msg.contains(m) {
                                    problems.push(format!("{ctx} {path}: no {m:?} in {msg}"));
                                }
                            }
                        }
                        Ok(Ok(_)) if must.is_some() => {
                            problems.push(format!("{ctx} {path}: accepted"))
                        }
                        Ok(Ok(_)) => {}
                    }
                }
                if let (Ok(f), Ok(u)) = (&fused, &unfused) {
                    if f.is_ok() != u.is_ok() {
                        problems.push(format!(
                            "{ctx}: fused {} but unfused {}",
                            f.as_ref().map_or_else(|e| e.clone(), |_| "accepts".into()),
                            u.as_ref().map_or_else(|e| e.clone(), |_| "accepts".into()),
                        ));
                    }
                }
            }
        }
    }
    assert!(calls > 300, "only {calls} calls");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `activated=true` takes probabilities: outside [0, 1] or NaN is an error on the CPU, as
/// torch's binary_cross_entropy, on both paths.
#[test]
fn activated_probabilities_outside_0_1_are_errors() {
    let labels = Tensor::from_slice(&[0i64, 1, 2]);
    let scores = Tensor::from_slice(&[0.5f32, 0.2, 0.9]);
    for bad in [1.5f32, -0.25, f32::NAN] {
        let pred = Tensor::from_slice(&[0.1f32, 0.2, 0.3, 0.4, bad, 0.6]).reshape([3, 2]);
        let focal = FocalLoss {
            activated: true,
            ..Default::default()
        };
        let qfl = QualityFocalLoss {
            activated: true,
            ..Default::default()
        };
        let none = LossArgs::new();
        let errs = [
            focal.forward(&pred, (&labels).into(), &none).unwrap_err(),
            focal
                .forward_unfused(&pred, (&labels).into(), &none)
                .unwrap_err(),
            qfl.forward(&pred, (&labels, &scores).into(), &none)
                .unwrap_err(),
            qfl.forward_unfused(&pred, (&labels, &scores).into(), &none)
                .unwrap_err(),
        ];
        for e in errs {
            let e = format!("{e:#}");
            assert!(e.contains("between 0 and 1"), "{bad}: {e}");
            assert!(e.contains("FocalLoss"), "{bad}: {e}");
        }
    }
}

fn focal_call(pred: &Tensor, labels: &Tensor, w: &Tensor, af: &Tensor) -> Tensor {
    FocalLoss::default()
        .forward(
            pred,
            labels.into(),
            &LossArgs::new().weight(w).avg_factor(af),
        )
        .unwrap()
}

/// An in-place change, after the forward pass, of any tensor the backward pass reads fails
/// backward with torch's own message, as a stock-op graph would.
#[test]
fn in_place_changes_after_forward_fail_backward() {
    let fresh = || {
        (
            Tensor::randn([5, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            Tensor::from_slice(&[0i64, 1, 2, 3, 0]),
            Tensor::rand([5], (Kind::Float, Device::Cpu)),
            Tensor::from(4.0f32),
        )
    };
    // Unchanged: backward works, twice with the graph retained.
    let (p, l, w, af) = fresh();
    let out = focal_call(&p, &l, &w, &af);
    Tensor::run_backward(&[&out], &[&p], true, false);
    Tensor::run_backward(&[&out], &[&p], false, false);

    for which in ["pred", "labels", "weight", "avg_factor"] {
        let (p, mut l, mut w, mut af) = fresh();
        let out = focal_call(&p, &l, &w, &af);
        tch::no_grad(|| match which {
            "pred" => {
                let _ = p.detach().f_add_scalar_(1.0).unwrap();
            }
            "labels" => {
                let _ = l.f_fill_(1).unwrap();
            }
            "weight" => {
                let _ = w.f_mul_scalar_(2.0).unwrap();
            }
            _ => {
                let _ = af.f_add_scalar_(1.0).unwrap();
            }
        });
        let e = out.f_backward().expect_err(which).to_string();
        assert!(
            e.contains("modified by an inplace operation"),
            "{which}: {e}"
        );
    }
}

/// A backward with create_graph fails with a clear error rather than silently dropping the
/// second-order term; the unfused composition supports it.
#[test]
fn double_backward_is_a_clear_error() {
    let p = Tensor::randn([5, 3], (Kind::Double, Device::Cpu)).set_requires_grad(true);
    let l = Tensor::from_slice(&[0i64, 1, 2, 3, 0]);
    let loss = FocalLoss::default();
    let out = loss.forward(&p, (&l).into(), &LossArgs::new()).unwrap();
    let e = catch_unwind(AssertUnwindSafe(|| {
        Tensor::run_backward(&[&out], &[&p], true, true)
    }))
    .expect_err("create_graph must fail");
    let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("create_graph"), "{msg}");
    let out = loss
        .forward_unfused(&p, (&l).into(), &LossArgs::new())
        .unwrap();
    let g = Tensor::run_backward(&[&out], &[&p], true, true).remove(0);
    assert!(
        g.requires_grad(),
        "the unfused path gives a differentiable gradient"
    );
}

/// Messages name the shape and kind the user passed.
#[test]
fn messages_name_what_was_passed() {
    let pred = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 0]);
    let focal = FocalLoss::default();
    let err = |w: &Tensor, fused: bool| {
        let a = LossArgs::new().weight(w);
        let r = if fused {
            focal.forward(&pred, (&labels).into(), &a)
        } else {
            focal.forward_unfused(&pred, (&labels).into(), &a)
        };
        format!("{:#}", r.unwrap_err())
    };
    // An (N, C+1) weight is named by its own shape, not by MMDetection's reshaped view.
    let w = Tensor::ones([5, 4], (Kind::Float, Device::Cpu));
    for fused in [true, false] {
        let e = err(&w, fused);
        assert!(e.contains("[5, 4]"), "{e}");
    }
    // A sparse weight is named as sparse.
    let e = err(
        &Tensor::ones([5], (Kind::Float, Device::Cpu)).to_sparse_sparse_dim(1),
        true,
    );
    assert!(e.contains("weight") && e.contains("Sparse"), "{e}");
    // An integer weight of any width is a weight; a complex one is named by its kind.
    let w16 = Tensor::ones([5], (Kind::Int16, Device::Cpu));
    let a = focal
        .forward(&pred, (&labels).into(), &LossArgs::new().weight(&w16))
        .unwrap();
    let b = focal
        .forward(&pred, (&labels).into(), &LossArgs::new())
        .unwrap();
    assert!(a.allclose(&b, 0.0, 0.0, false));
    let e = err(&Tensor::ones([5], (Kind::ComplexFloat, Device::Cpu)), true);
    assert!(e.contains("ComplexFloat"), "{e}");
    // Empty results stay valid.
    let out = focal
        .forward(
            &pred.narrow(0, 0, 0),
            (&labels.narrow(0, 0, 0)).into(),
            &LossArgs::new().reduction(Reduction::None),
        )
        .unwrap();
    assert_eq!(out.size(), [0, 3]);
}

/// A DDQAuxLoss call's result, error message, or panic.
type DdqOutcome = Result<Result<tch_detloss::losses::DDQAuxLosses, String>, String>;

/// DDQAuxLoss (not a registered loss, so not in the matrix above): every malformed call is an
/// error naming what is wrong, never a panic; the edge cases MMDetection handles give results.
#[test]
fn ddq_aux_loss_bad_inputs_are_errors_and_edges_are_results() {
    use tch_detloss::losses::DDQAuxLoss;
    let loss = DDQAuxLoss::from_config(&serde_json::json!({"type": "DDQAuxLoss"})).unwrap();
    let opts = (Kind::Float, Device::Cpu);
    let scores = Tensor::rand([2, 12, 3], opts);
    let xy = Tensor::rand([2, 12, 2], opts) * 40.0;
    let boxes = Tensor::cat(&[&xy, &(&xy + 20.0)], 2);
    let gt = Tensor::from_slice(&[5.0f32, 5.0, 30.0, 40.0, 10.0, 0.0, 50.0, 20.0]).view([2, 4]);
    let labels = Tensor::from_slice(&[2i64, 0]);
    let none_b = Tensor::zeros([0, 4], opts);
    let none_l = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
    let shapes = [(80, 96), (80, 96)];
    let run = |s: &Tensor, b: &Tensor, g: &[Tensor], l: &[Tensor], sh: &[(i64, i64)]| {
        catch_unwind(AssertUnwindSafe(|| {
            loss.loss(s, b, g, l, sh).map_err(|e| format!("{e:#}"))
        }))
        .map_err(|_| "panic".to_string())
    };
    let gts = [gt.shallow_clone(), none_b.shallow_clone()];
    let lbs = [labels.shallow_clone(), none_l.shallow_clone()];
    let ok = run(&scores, &boxes, &gts, &lbs, &shapes).unwrap().unwrap();
    assert_eq!(ok.aux_loss_cls.len(), 2);
    // The image without ground truths: label weights 0, so both of its losses are 0.
    assert_eq!(ok.aux_loss_cls[1].double_value(&[]), 0.0);
    assert_eq!(ok.aux_loss_bbox[1].double_value(&[]), 0.0);
    assert!(ok.aux_loss_cls[0].double_value(&[]) > 0.0);

    let nan_scores = scores.copy();
    let _ = nan_scores.get(0).get(3).fill_(f64::NAN);
    let bad: Vec<(&str, DdqOutcome, &str)> = vec![
        (
            "2-dim scores",
            run(&scores.get(0), &boxes, &gts, &lbs, &shapes),
            "cls_scores",
        ),
        (
            "boxes of 5",
            run(
                &scores,
                &Tensor::cat(&[&boxes, &xy.narrow(2, 0, 1)], 2),
                &gts,
                &lbs,
                &shapes,
            ),
            "bbox_preds",
        ),
        (
            "float64",
            run(
                &scores.to_kind(Kind::Double),
                &boxes.to_kind(Kind::Double),
                &gts,
                &lbs,
                &shapes,
            ),
            "float32",
        ),
        (
            "int scores",
            run(&scores.to_kind(Kind::Int64), &boxes, &gts, &lbs, &shapes),
            "cls_scores",
        ),
        (
            "one gt list",
            run(&scores, &boxes, &gts[..1], &lbs, &shapes),
            "gt_bboxes",
        ),
        (
            "label 3 of 3 classes",
            run(
                &scores,
                &boxes,
                &gts,
                &[Tensor::from_slice(&[3i64, 0]), none_l.shallow_clone()],
                &shapes,
            ),
            "gt_labels",
        ),
        (
            "label -1",
            run(
                &scores,
                &boxes,
                &gts,
                &[Tensor::from_slice(&[-1i64, 0]), none_l.shallow_clone()],
                &shapes,
            ),
            "gt_labels",
        ),
        (
            "float labels",
            run(
                &scores,
                &boxes,
                &gts,
                &[labels.to_kind(Kind::Float), none_l.shallow_clone()],
                &shapes,
            ),
            "gt_labels",
        ),
        (
            "labels for 3 boxes",
            run(
                &scores,
                &boxes,
                &gts,
                &[Tensor::from_slice(&[1i64, 0, 2]), none_l.shallow_clone()],
                &shapes,
            ),
            "gt_labels",
        ),
        (
            "float64 gts",
            run(
                &scores,
                &boxes,
                &[gt.to_kind(Kind::Double), none_b.shallow_clone()],
                &lbs,
                &shapes,
            ),
            "gt_bboxes",
        ),
        (
            "NaN score",
            run(&nan_scores, &boxes, &gts, &lbs, &shapes),
            "NaN",
        ),
        (
            "undefined scores",
            run(&Tensor::new(), &boxes, &gts, &lbs, &shapes),
            "undefined",
        ),
    ];
    for (what, r, word) in bad {
        match r {
            Err(p) => panic!("{what}: {p}"),
            Ok(Ok(_)) => panic!("{what}: accepted"),
            Ok(Err(msg)) => assert!(
                msg.contains("DDQAuxLoss") && msg.contains(word),
                "{what}: {msg}"
            ),
        }
    }
    // Fewer queries than ground truths: no query is matched (topk = Q / G = 0), every query is
    // background with weight 1, as in MMDetection.
    let few = run(
        &scores.narrow(1, 0, 1),
        &boxes.narrow(1, 0, 1),
        &gts,
        &lbs,
        &shapes,
    )
    .unwrap()
    .unwrap();
    assert_eq!(few.aux_loss_bbox[0].double_value(&[]), 0.0);
    // An empty batch gives empty lists.
    let empty = run(
        &scores.narrow(0, 0, 0),
        &boxes.narrow(0, 0, 0),
        &[],
        &[],
        &[],
    )
    .unwrap()
    .unwrap();
    assert!(empty.aux_loss_cls.is_empty() && empty.aux_loss_bbox.is_empty());
    // Other assigners, costs and keys are config errors.
    for (cfg, word) in [
        (
            serde_json::json!({"type": "DDQAuxLoss", "train_cfg": {"assigner": {"type": "TaskAlignedAssigner", "topk": 2}}}),
            "TopkHungarianAssigner",
        ),
        (
            serde_json::json!({"type": "DDQAuxLoss", "train_cfg": {"assigner": {"type": "TopkHungarianAssigner", "topk": 2, "cls_cost": {"type": "FocalLossCost", "binary_input": true}}}}),
            "binary_input",
        ),
        (
            serde_json::json!({"type": "DDQAuxLoss", "loss_cls": {"type": "NoSuchLoss"}}),
            "NoSuchLoss",
        ),
        (
            serde_json::json!({"type": "DDQAuxLoss", "gamma": 2.0}),
            "gamma",
        ),
        (serde_json::json!({"type": "FocalLoss"}), "FocalLoss"),
    ] {
        let e = format!(
            "{:#}",
            DDQAuxLoss::from_config(&cfg)
                .err()
                .unwrap_or_else(|| panic!("{cfg} accepted"))
        );
        assert!(e.contains(word), "{cfg}: {e}");
    }
}
