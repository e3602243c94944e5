//! What is particular to the box losses: a box (or element) whose weight is 0 contributes
//! nothing even when its coordinates are garbage, on the CPU and the emulated device; the
//! zero-weight short-cut with negative weights; and the bad inputs MMDetection rejects.

use tch::{Device, Kind, Tensor};
use tch_detloss::testing::{with_emulated_device, EmulatedDevice};
use tch_detloss::{registry, LossArgs, Reduction};

use crate::common::{assert_close, box_pairs, rng_lock};

const BOX_LOSSES: &[&str] = &[
    r#"{"type": "L1Loss"}"#,
    r#"{"type": "SmoothL1Loss", "beta": 0.11}"#,
    r#"{"type": "BalancedL1Loss"}"#,
    r#"{"type": "IoULoss"}"#,
    r#"{"type": "GIoULoss"}"#,
    r#"{"type": "DIoULoss"}"#,
    r#"{"type": "CIoULoss"}"#,
    r#"{"type": "GHMR"}"#,
];

/// Boxes and a weight per box (about half zero), as (N,) for the IoU family and (N, 4) otherwise.
fn boxes_and_weight(config: &str, n: i64) -> (Tensor, Tensor, Tensor) {
    let _rng = rng_lock();
    tch::manual_seed(11);
    let (pred, target) = box_pairs(n, !config.contains("CIoU"));
    let keep = Tensor::rand([n], (Kind::Double, Device::Cpu)).gt(0.5);
    let w = (Tensor::rand([n], (Kind::Double, Device::Cpu)) + 0.25) * &keep;
    let w = if config.contains("IoU") {
        w
    } else {
        w.unsqueeze(1).expand([n, 4], false).contiguous()
    };
    (
        pred.to_kind(Kind::Float),
        target.to_kind(Kind::Float),
        w.to_kind(Kind::Float),
    )
}

fn fused(
    config: &str,
    pred: &Tensor,
    target: &Tensor,
    w: &Tensor,
    red: Reduction,
) -> (Tensor, Tensor) {
    let loss = registry::build_str(config).unwrap();
    let pred = pred.detach().set_requires_grad(true);
    let l = loss
        .forward(
            &pred,
            target.into(),
            &LossArgs::new().weight(w).reduction(red),
        )
        .unwrap();
    l.sum(Kind::Double).backward();
    (l.detach(), pred.grad())
}

/// The all-anchors form of a box head: the loss over every anchor with weight 0 for the
/// negatives, whose regressions and targets are garbage (NaN, inf), gives the loss of the
/// positives alone and a zero gradient on the negatives.
#[rstest::rstest]
fn zero_weight_boxes_contribute_nothing(#[values(false, true)] emulated: bool) {
    let run = || {
        for config in BOX_LOSSES {
            let n = 300;
            let (pred, target, w) = boxes_and_weight(config, n);
            let zero = if w.dim() == 1 {
                w.eq(0.0)
            } else {
                w.select(1, 0).eq(0.0)
            };
            let zero4 = zero.unsqueeze(1).expand([n, 4], false);
            let garbage_pred = pred.masked_fill(&zero4, f64::NAN);
            let garbage_target = target.masked_fill(&zero4, f64::INFINITY);
            for red in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                if config.contains("GHMR") && red == Reduction::Sum {
                    continue; // MMDetection's error
                }
                let (want, want_grad) = fused(config, &pred, &target, &w, red);
                let (got, got_grad) = fused(config, &garbage_pred, &garbage_target, &w, red);
                assert!(
                    got.isfinite().all().int64_value(&[]) == 1,
                    "{config} {red:?}: not finite"
                );
                if red != Reduction::None {
                    assert_close(
                        &got,
                        &want.to_kind(Kind::Double),
                        Kind::Float,
                        &format!("{config} {red:?}"),
                    );
                } else {
                    let w_rows = zero.logical_not();
                    let pick = |t: &Tensor| t.index(&[Some(&w_rows)]).to_kind(Kind::Double);
                    assert_close(
                        &pick(&got),
                        &pick(&want),
                        Kind::Float,
                        &format!("{config} none"),
                    );
                }
                let w_rows = zero.logical_not();
                assert_close(
                    &got_grad.index(&[Some(&w_rows)]),
                    &want_grad.index(&[Some(&w_rows)]).to_kind(Kind::Double),
                    Kind::Float,
                    &format!("{config} {red:?}: gradient"),
                );
                let grad_zero = got_grad.index(&[Some(&zero)]);
                assert_eq!(
                    grad_zero.abs().sum(Kind::Double).double_value(&[]),
                    0.0,
                    "{config} {red:?}: gradient on zero-weight boxes"
                );
            }
        }
    };
    if emulated {
        with_emulated_device(EmulatedDevice::default(), run);
    } else {
        run();
    }
}

/// The short-cut applies where no weight is > 0, negative weights included: the result is then
/// `sum(pred * weight)`, neither reduced nor scaled, and its gradient the weight (decided on the
/// device for 'mean' and 'sum').
#[test]
fn the_short_cut_with_negative_weights() {
    for config in [
        r#"{"type": "SmoothL1Loss", "loss_weight": 3.0}"#,
        r#"{"type": "GIoULoss", "loss_weight": 3.0}"#,
        r#"{"type": "CIoULoss", "loss_weight": 3.0}"#,
    ] {
        let (pred, target, _) = boxes_and_weight(config, 50);
        let w = Tensor::full([50], -0.5, (Kind::Float, Device::Cpu));
        let loss = registry::build_str(config).unwrap();
        for emulated in [false, true] {
            let run = || {
                let p = pred.detach().set_requires_grad(true);
                let l = loss
                    .forward(
                        &p,
                        (&target).into(),
                        &LossArgs::new().weight(&w).avg_factor(7.0),
                    )
                    .unwrap();
                l.backward();
                (l.detach(), p.grad())
            };
            let (l, g) = if emulated {
                with_emulated_device(EmulatedDevice::default(), run)
            } else {
                run()
            };
            let want = (&pred * w.unsqueeze(1)).sum(Kind::Double);
            assert_eq!(l.size(), Vec::<i64>::new(), "{config}");
            assert_close(&l, &want, Kind::Float, config);
            assert_close(
                &g,
                &w.unsqueeze(1).expand([50, 4], false).to_kind(Kind::Double),
                Kind::Float,
                config,
            );
        }
    }
}

/// What MMDetection rejects, with a clear error: boxes that are not (N, 4), shapes that differ,
/// `beta <= 0`, an unknown IoU mode, a weight that does not broadcast.
#[test]
fn bad_box_inputs_are_errors() {
    let p = Tensor::rand([6, 4], (Kind::Float, Device::Cpu));
    let p5 = Tensor::rand([6, 5], (Kind::Float, Device::Cpu));
    let t3 = Tensor::rand([3, 4], (Kind::Float, Device::Cpu));
    for config in BOX_LOSSES {
        let loss = registry::build_str(config).unwrap();
        let w = Tensor::ones([6, 4], (Kind::Float, Device::Cpu));
        let e = loss
            .forward(&p, (&t3).into(), &LossArgs::new().weight(&w))
            .unwrap_err();
        assert!(format!("{e:#}").contains("shape"), "{config}: {e:#}");
        if config.contains("IoU") {
            let e = loss
                .forward(&p5, (&p5).into(), &LossArgs::new())
                .unwrap_err();
            assert!(format!("{e:#}").contains("(N, 4)"), "{config}: {e:#}");
        }
    }
    for bad in [
        r#"{"type": "SmoothL1Loss", "beta": 0.0}"#,
        r#"{"type": "SmoothL1Loss", "beta": -1.0}"#,
        r#"{"type": "BalancedL1Loss", "beta": 0.0}"#,
        r#"{"type": "IoULoss", "mode": "cubic"}"#,
    ] {
        let e = registry::build_str(bad).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("beta") || msg.contains("mode"), "{bad}: {msg}");
    }
    // An (N,) weight with N != 4 does not broadcast against (N, 4): torch's message.
    let loss = registry::build_str(r#"{"type": "L1Loss"}"#).unwrap();
    let w = Tensor::ones([6], (Kind::Float, Device::Cpu));
    let e = loss
        .forward(&p, (&p).into(), &LossArgs::new().weight(&w))
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("The size of tensor a (4) must match the size of tensor b (6) at non-singleton dimension 1"),
        "{e:#}"
    );
    // IoULoss asserts an (N, 1) weight's shape (only (N,) or (N, 4)).
    let loss = registry::build_str(r#"{"type": "GIoULoss"}"#).unwrap();
    let w = Tensor::ones([6, 1], (Kind::Float, Device::Cpu));
    let e = loss
        .forward(&p, (&p).into(), &LossArgs::new().weight(&w))
        .unwrap_err();
    assert!(format!("{e:#}").contains("pred's shape"), "{e:#}");
}

/// MSELoss fuses any rank (viewed as rows of the last dimension) and gives the stock
/// composition's result and gradient, in pred's shape for 'none'; a target that torch broadcasts
/// against pred takes the stock composition and still agrees with it.
#[test]
fn mse_any_rank_and_broadcasts() {
    let _g = rng_lock();
    tch::manual_seed(11);
    let f = (Kind::Double, Device::Cpu);
    for reduction in ["none", "mean", "sum"] {
        let cfg =
            format!(r#"{{"type": "MSELoss", "reduction": "{reduction}", "loss_weight": 1.5}}"#);
        let loss = registry::build_str(&cfg).unwrap();
        for (shape, tshape) in [
            (vec![2i64, 3, 5], vec![2i64, 3, 5]),
            (vec![7], vec![7]),
            (vec![4, 6], vec![6]),
        ] {
            let pred = Tensor::randn(shape.as_slice(), f);
            let target = Tensor::randn(tshape.as_slice(), f);
            let weight = Tensor::rand(shape.as_slice(), f);
            let run = |fused: bool| {
                let p = pred.copy().set_requires_grad(true);
                let args = LossArgs::new().weight(&weight);
                let out = if fused {
                    loss.forward(&p, (&target).into(), &args)
                } else {
                    loss.forward_unfused(&p, (&target).into(), &args)
                }
                .unwrap();
                out.sum(Kind::Double).backward();
                (out, p.grad())
            };
            let ((out, grad), (want, want_grad)) = (run(true), run(false));
            let what = format!("{reduction} {shape:?} vs {tshape:?}");
            assert_eq!(out.size(), want.size(), "{what}");
            assert_close(&out, &want, Kind::Double, &format!("{what}: loss"));
            assert_close(&grad, &want_grad, Kind::Double, &format!("{what}: grad"));
        }
    }
}
