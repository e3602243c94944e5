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
