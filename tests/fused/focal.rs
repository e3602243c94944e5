//! What is particular to the focal family: its bad inputs, label conventions, non-finite logits,
//! empty batches and graph recording.

use tch::{Device, Kind, Tensor};
use tch_detloss::losses::{FocalLoss, QualityFocalLoss};
use tch_detloss::{registry, Loss, LossArgs, Reduction};

fn focal_err(pred: &Tensor, target: &Tensor, args: &LossArgs) -> String {
    let e = FocalLoss::default()
        .forward(pred, target.into(), args)
        .expect_err("must be rejected");
    format!("{e:#}")
}

#[test]
fn bad_inputs_are_errors() {
    let pred = Tensor::randn([6, 4], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0]);
    let none = LossArgs::new();
    // Wrong dims and shapes.
    assert!(focal_err(&pred.reshape([24]), &labels, &none).contains("(N, C)"));
    assert!(focal_err(&pred.reshape([2, 3, 4]), &labels, &none).contains("(N, C)"));
    assert!(focal_err(&pred, &labels.narrow(0, 0, 5), &none).contains("(6,)"));
    assert!(focal_err(
        &pred,
        &Tensor::zeros([6, 5], (Kind::Float, Device::Cpu)),
        &none
    )
    .contains("shape"));
    // Wrong dtypes.
    assert!(focal_err(&pred.to_kind(Kind::Int64), &labels, &none).contains("float32"));
    assert!(focal_err(&pred, &labels.to_kind(Kind::Float), &none).contains("integer"));
    // Labels below 0 and above C (C = 4 is background and valid).
    let e = focal_err(&pred, &Tensor::from_slice(&[0i64, 1, 2, 3, -1, 0]), &none);
    assert!(e.contains("outside [0, 4]"), "{e}");
    let e = focal_err(&pred, &Tensor::from_slice(&[0i64, 5, 2, 3, 4, 0]), &none);
    assert!(e.contains("outside [0, 4]"), "{e}");
    // avg_factor with sum, as MMDetection.
    let e = focal_err(
        &pred,
        &labels,
        &LossArgs::new().reduction(Reduction::Sum).avg_factor(2.0),
    );
    assert!(
        e.contains("avg_factor can not be used with reduction=\"sum\""),
        "{e}"
    );
    // avg_factor tensor of more than one element.
    let two = Tensor::from_slice(&[1.0f32, 2.0]);
    assert!(focal_err(&pred, &labels, &LossArgs::new().avg_factor(&two)).contains("one-element"));
    // Weights that do not broadcast.
    let w = Tensor::ones([5], (Kind::Float, Device::Cpu));
    assert!(focal_err(&pred, &labels, &LossArgs::new().weight(&w)).contains("weight"));
    // The unfused compositions reject the same inputs instead of panicking in a stock op.
    let unfused_err = |t: &Tensor, a: &LossArgs| {
        let e = FocalLoss::default()
            .forward_unfused(&pred, t.into(), a)
            .expect_err("must be rejected");
        format!("{e:#}")
    };
    assert!(
        unfused_err(&Tensor::zeros([6, 5], (Kind::Float, Device::Cpu)), &none).contains("shape")
    );
    assert!(unfused_err(&labels, &LossArgs::new().avg_factor(&two)).contains("one-element"));
    let e = unfused_err(
        &labels,
        &LossArgs::new().reduction(Reduction::Sum).avg_factor(2.0),
    );
    assert!(e.contains("avg_factor can not be used"), "{e}");
    // QFL takes (labels, scores) or a dense target; labels alone are not (N, C).
    let e = QualityFocalLoss::default()
        .forward(&pred, (&labels).into(), &none)
        .unwrap_err();
    assert!(format!("{e:#}").contains("shape"), "{e:#}");
    // Invalid configs name what is valid.
    let e = registry::build_str(r#"{"type": "FocalLoss", "gama": 2.0}"#).unwrap_err();
    assert!(format!("{e:#}").contains("gamma"), "{e:#}");
    let e = registry::build_str(r#"{"type": "FocalLoss", "use_sigmoid": false}"#).unwrap_err();
    assert!(format!("{e:#}").contains("use_sigmoid"), "{e:#}");
    let e = registry::build_str(r#"{"type": "NoSuchLoss"}"#).unwrap_err();
    assert!(format!("{e:#}").contains("FocalLoss"), "{e:#}");
    let e = registry::build_str(r#"{"type": "VarifocalLoss", "alpha": -1.0}"#).unwrap_err();
    assert!(format!("{e:#}").contains("alpha"), "{e:#}");
}

/// QFL follows MMDetection: any label outside [0, C) is background, not an error.
#[test]
fn qfl_labels_out_of_range_are_background() {
    let pred = Tensor::randn([5, 3], (Kind::Double, Device::Cpu));
    let scores = Tensor::rand([5], (Kind::Double, Device::Cpu));
    let odd = Tensor::from_slice(&[-1i64, 3, 7, 0, 2]);
    let bg = Tensor::from_slice(&[3i64, 3, 3, 0, 2]);
    let l = QualityFocalLoss::default();
    let a = l
        .forward(&pred, (&odd, &scores).into(), &LossArgs::new())
        .unwrap();
    let b = l
        .forward(&pred, (&bg, &scores).into(), &LossArgs::new())
        .unwrap();
    assert!(a.allclose(&b, 0.0, 0.0, false));
}

/// Non-finite logits give what the stock-op composition gives (NaN propagates), never a crash.
#[test]
fn non_finite_logits_match_unfused() {
    for config in [
        r#"{"type": "FocalLoss"}"#,
        r#"{"type": "VarifocalLoss"}"#,
        r#"{"type": "QualityFocalLoss"}"#,
    ] {
        let loss = registry::build_str(config).unwrap();
        let pred =
            Tensor::from_slice(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.5, -40.0, 40.0])
                .reshape([3, 2]);
        let target = Tensor::from_slice(&[1.0f64, 0.0, 1.0, 0.0, 0.5, 1.0]).reshape([3, 2]);
        let args = LossArgs::new().reduction(Reduction::None);
        let got = loss.forward(&pred, (&target).into(), &args).unwrap();
        let want = loss
            .forward_unfused(&pred, (&target).into(), &args)
            .unwrap();
        assert!(
            got.isnan().equal(&want.isnan()),
            "{config}: NaN pattern {got} vs {want}"
        );
        let finite = want.isfinite();
        assert!(
            got.masked_select(&finite)
                .allclose(&want.masked_select(&finite), 1e-12, 1e-12, false),
            "{config}"
        );
        let mean = loss
            .forward(&pred, (&target).into(), &LossArgs::new())
            .unwrap();
        assert!(
            mean.double_value(&[]).is_nan(),
            "{config}: a NaN logit makes the mean NaN"
        );
    }
}

/// An empty batch: 'none' is empty, 'sum' is 0, 'mean' is NaN (0/0, as torch) unless an
/// avg_factor is given; backward gives an empty gradient.
#[test]
fn empty_batch() {
    let pred = Tensor::zeros([0, 80], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let labels = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
    let l = FocalLoss::default();
    let none = l
        .forward(
            &pred,
            (&labels).into(),
            &LossArgs::new().reduction(Reduction::None),
        )
        .unwrap();
    assert_eq!(none.size(), [0, 80]);
    let sum = l
        .forward(
            &pred,
            (&labels).into(),
            &LossArgs::new().reduction(Reduction::Sum),
        )
        .unwrap();
    assert_eq!(sum.double_value(&[]), 0.0);
    let mean = l
        .forward(&pred, (&labels).into(), &LossArgs::new())
        .unwrap();
    assert!(mean.double_value(&[]).is_nan());
    let avg = l
        .forward(&pred, (&labels).into(), &LossArgs::new().avg_factor(1.0))
        .unwrap();
    assert_eq!(avg.double_value(&[]), 0.0);
    avg.backward();
    assert_eq!(pred.grad().size(), [0, 80]);
}

/// With no input requiring grad the fused path records nothing.
#[test]
fn no_graph_without_requires_grad() {
    let pred = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3]);
    let out = FocalLoss::default()
        .forward(&pred, (&labels).into(), &LossArgs::new())
        .unwrap();
    assert!(!out.requires_grad());
    let out = tch::no_grad(|| {
        let p = pred.set_requires_grad(true);
        FocalLoss::default()
            .forward(&p, (&labels).into(), &LossArgs::new())
            .unwrap()
    });
    assert!(!out.requires_grad());
}

/// GaussianFocalLoss's `pos_inds` form (the positives gathered, each term reduced on its own):
/// the fused negative term against the stock composition, on the CPU and the emulated device,
/// every reduction; 'none' with one positive per row broadcasts, as in MMDetection.
#[test]
fn gaussian_focal_pos_inds_form_matches_unfused() {
    use crate::common::{assert_close, rng_lock};
    let _rng = rng_lock();
    tch::manual_seed(17);
    let (n, c) = (300, 7);
    let loss = registry::build_str(
        r#"{"type": "GaussianFocalLoss", "alpha": 2.0, "gamma": 4.0, "pos_weight": 1.5, "neg_weight": 0.5}"#,
    )
    .unwrap();
    for kind in [Kind::Double, Kind::Float] {
        let pred = Tensor::rand([n, c], (Kind::Double, Device::Cpu)).clamp(1e-3, 1.0 - 1e-3);
        let target = Tensor::rand([n, c], (Kind::Double, Device::Cpu)).pow_tensor_scalar(3);
        for (m, red) in [
            (40, Reduction::Mean),
            (40, Reduction::Sum),
            (n, Reduction::None),
            (1, Reduction::None),
        ] {
            let inds = Tensor::randperm(n, (Kind::Int64, Device::Cpu)).narrow(0, 0, m);
            let labels = Tensor::randint(c, [m], (Kind::Int64, Device::Cpu));
            let args = LossArgs::new().reduction(red).positives(&inds, &labels);
            let run = |fused: bool, emulated: bool| {
                let p = pred.to_kind(kind).set_requires_grad(true);
                let t = target.to_kind(kind);
                let go = || {
                    if fused {
                        loss.forward(&p, (&t).into(), &args)
                    } else {
                        loss.forward_unfused(&p, (&t).into(), &args)
                    }
                    .unwrap()
                };
                let out = if emulated {
                    tch_detloss::testing::with_emulated_device(Default::default(), go)
                } else {
                    go()
                };
                out.sum(Kind::Double).backward();
                (out.to_kind(Kind::Double), p.grad().to_kind(Kind::Double))
            };
            let (want, want_g) = run(false, false);
            for emulated in [false, true] {
                let (got, got_g) = run(true, emulated);
                let ctx = format!("{kind:?} m={m} {red:?} emulated={emulated}");
                assert_eq!(got.size(), want.size(), "{ctx}");
                assert_close(&got, &want, kind, &format!("{ctx}: loss"));
                assert_close(&got_g, &want_g, kind, &format!("{ctx}: grad"));
            }
        }
    }
}
