//! What is particular to CrossEntropyLoss, DistributionFocalLoss and GHMC: GHM-C's bins at their
//! float32 edges, its momentum state (checkpoints, threads), ignored labels, the call-time
//! `ignore_index`, and out-of-range targets (an error on the CPU, NaN rows on a device).

use std::sync::Arc;

use tch::{Device, Kind, Tensor};
use tch_detloss::losses::{CrossEntropyLoss, DistributionFocalLoss, GHMC};
use tch_detloss::testing::{with_emulated_device, EmulatedDevice};
use tch_detloss::{registry, Loss, LossArgs, Reduction};

fn assert_same(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    let err = tch_detloss::golden::rel_err(got, &want.to_kind(got.kind())).unwrap();
    assert!(err <= tol, "{what}: error {err:e}\n{got}\n{want}");
}

/// g = |sigmoid(0) - t| = |0.5 - t| lands exactly on each float32 edge k / bins (exact in float64
/// for t = 0.5 - edge), on 1.0 (the last bin) and just past the last edge 1 + 1e-6 (no bin):
/// fused on the CPU and on the emulated device agree with the unfused composition, which
/// compares with torch's own float32 edge table.
#[test]
fn ghmc_gradient_norms_on_the_float32_edges() {
    for bins in [10i64, 30] {
        let mut g: Vec<f64> = (0..bins)
            .map(|k| f64::from(k as f32 / bins as f32))
            .collect();
        g.extend([1.0, f64::from(1.0f32 + 1e-6f32), 0.55, 0.999_999_9]);
        let t: Vec<f64> = g.iter().map(|g| 0.5 - g).collect();
        let n = t.len() as i64;
        let target = Tensor::from_slice(&t).reshape([n, 1]);
        let pred = Tensor::zeros([n, 1], (Kind::Double, Device::Cpu));
        let lw = Tensor::ones([n, 1], (Kind::Double, Device::Cpu));
        let loss = GHMC {
            bins,
            ..Default::default()
        };
        for red in [Reduction::None, Reduction::Mean] {
            let args = LossArgs::new().weight(&lw).reduction(red);
            let want = loss
                .forward_unfused(&pred, (&target).into(), &args)
                .unwrap();
            // 'none' is loss * weight: each element's weight shows which bin it landed in.
            let host = loss.forward(&pred, (&target).into(), &args).unwrap();
            assert_same(&host, &want, 1e-7, &format!("bins {bins} {red:?} CPU"));
            let dev = with_emulated_device(EmulatedDevice::default(), || {
                loss.forward(&pred, (&target).into(), &args).unwrap()
            });
            assert_same(&dev, &want, 1e-7, &format!("bins {bins} {red:?} device"));
        }
    }
}

/// The momentum state moves with each call, exactly as MMDetection's float32 arithmetic (the
/// unfused composition on a second loss object, in lockstep), survives a checkpoint through
/// `state` / `load_state`, and is safe to share between threads.
#[test]
fn ghmc_momentum_state_checkpoints_and_threads() {
    let config = r#"{"type": "GHMC", "bins": 30, "momentum": 0.75}"#;
    let fused = registry::build_str(config).unwrap();
    let reference = registry::build_str(config).unwrap();
    tch::manual_seed(5);
    let pred = Tensor::randn([64, 5], (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(6, [64], (Kind::Int64, Device::Cpu));
    let lw = Tensor::ones([64], (Kind::Float, Device::Cpu));
    let args = LossArgs::new().weight(&lw);
    for call in 0..3 {
        let a = fused.forward(&pred, (&labels).into(), &args).unwrap();
        let b = reference
            .forward_unfused(&pred, (&labels).into(), &args)
            .unwrap();
        assert_same(&a, &b, 2e-6, &format!("call {call}"));
        let (sa, sb) = (
            &fused.state().unwrap()[0].1,
            &reference.state().unwrap()[0].1,
        );
        assert!(sa.equal(sb), "call {call}: state {sa} vs {sb}");
    }
    // A checkpoint: a fresh loss with the saved state continues as the original.
    let saved = fused.state().unwrap();
    let restored = registry::build_str(config).unwrap();
    restored.load_state(&saved[0].0, &saved[0].1).unwrap();
    let a = fused.forward(&pred, (&labels).into(), &args).unwrap();
    let b = restored.forward(&pred, (&labels).into(), &args).unwrap();
    assert!(a.equal(&b));
    assert!(restored
        .load_state("acc_sum", &Tensor::zeros([7], (Kind::Float, Device::Cpu)))
        .is_err());
    assert!(restored.load_state("edges", &saved[0].1).is_err());

    // 4 threads x 5 calls on one shared loss: the same inputs give the same update whatever the
    // order, so the state ends as after 20 calls in a row.
    let shared: Arc<dyn Loss> = Arc::from(registry::build_str(config).unwrap());
    let serial = registry::build_str(config).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            let shared = shared.clone();
            let (pred, labels, lw) = (
                pred.shallow_clone(),
                labels.shallow_clone(),
                lw.shallow_clone(),
            );
            s.spawn(move || {
                for _ in 0..5 {
                    let _ = shared
                        .forward(&pred, (&labels).into(), &LossArgs::new().weight(&lw))
                        .unwrap();
                }
            });
        }
    });
    for _ in 0..20 {
        let _ = serial.forward(&pred, (&labels).into(), &args).unwrap();
    }
    assert!(shared.state().unwrap()[0]
        .1
        .equal(&serial.state().unwrap()[0].1));
}

#[test]
fn ghmc_rejects_sum_and_a_missing_label_weight() {
    let pred = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3]);
    let lw = Tensor::ones([4], (Kind::Float, Device::Cpu));
    let e = GHMC::default()
        .forward(&pred, (&labels).into(), &LossArgs::new())
        .unwrap_err();
    assert!(format!("{e:#}").contains("label_weight"), "{e:#}");
    let e = GHMC::default()
        .forward(
            &pred,
            (&labels).into(),
            &LossArgs::new().weight(&lw).reduction(Reduction::Sum),
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("reduction=\"sum\""), "{e:#}");
    assert!(registry::build_str(r#"{"type": "GHMC", "use_sigmoid": false}"#).is_err());
    assert!(registry::build_str(r#"{"type": "GHMC", "bins": 0}"#).is_err());
}

/// Every label ignored: 0 for every reduction (avg_non_ignore divides 0 by eps), zero
/// gradients, on both paths and both executors.
#[test]
fn cross_entropy_all_ignored() {
    let pred = Tensor::randn([5, 4], (Kind::Double, Device::Cpu));
    let labels = Tensor::full([5], 255, (Kind::Int64, Device::Cpu));
    for config in [
        r#"{"type": "CrossEntropyLoss", "ignore_index": 255, "avg_non_ignore": true}"#,
        r#"{"type": "CrossEntropyLoss", "ignore_index": 255}"#,
        r#"{"type": "CrossEntropyLoss", "use_sigmoid": true, "ignore_index": 255, "avg_non_ignore": true}"#,
    ] {
        let loss = registry::build_str(config).unwrap();
        for red in [Reduction::None, Reduction::Mean, Reduction::Sum] {
            let args = LossArgs::new().reduction(red);
            for device in [false, true] {
                let p = pred.detach().set_requires_grad(true);
                let run = || loss.forward(&p, (&labels).into(), &args).unwrap();
                let out = if device {
                    with_emulated_device(EmulatedDevice::default(), run)
                } else {
                    run()
                };
                assert_eq!(
                    out.abs().sum(Kind::Double).double_value(&[]),
                    0.0,
                    "{config} {red:?}"
                );
                out.sum(Kind::Double).backward();
                assert_eq!(p.grad().abs().sum(Kind::Double).double_value(&[]), 0.0);
            }
            let want = loss
                .forward_unfused(&pred, (&labels).into(), &args)
                .unwrap();
            assert_eq!(want.abs().sum(Kind::Double).double_value(&[]), 0.0);
        }
    }
}

/// A call's `ignore_index` overrides the config's; losses without one reject it.
#[test]
fn call_time_ignore_index() {
    let pred = Tensor::randn([6, 4], (Kind::Double, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 3, 3, 1, 2, 3]);
    let loss = CrossEntropyLoss {
        ignore_index: Some(1),
        ..Default::default()
    };
    let call = loss
        .forward(&pred, (&labels).into(), &LossArgs::new().ignore_index(3))
        .unwrap();
    let want = loss
        .forward_unfused(&pred, (&labels).into(), &LossArgs::new().ignore_index(3))
        .unwrap();
    assert_same(&call, &want, 1e-12, "ignore_index 3");
    let configured = loss
        .forward(&pred, (&labels).into(), &LossArgs::new())
        .unwrap();
    assert!(!configured.allclose(&call, 1e-9, 1e-9, false));
    let e = tch_detloss::losses::FocalLoss::default()
        .forward(&pred, (&labels).into(), &LossArgs::new().ignore_index(3))
        .unwrap_err();
    assert!(format!("{e:#}").contains("ignore_index"), "{e:#}");
    let e = registry::build_str(r#"{"type": "CrossEntropyLoss", "use_mask": true}"#).unwrap_err();
    assert!(format!("{e:#}").contains("use_mask"), "{e:#}");
}

/// Out-of-range targets: CrossEntropyLoss labels outside [0, C) other than ignore_index and DFL
/// distances outside [0, reg_max) are errors on the CPU (both paths) and NaN rows on a device.
#[test]
fn out_of_range_targets() {
    let pred = Tensor::randn([4, 5], (Kind::Float, Device::Cpu));
    let none = LossArgs::new().reduction(Reduction::None);
    let labels = Tensor::from_slice(&[0i64, 5, 2, -3]);
    let ce = CrossEntropyLoss::default();
    let e = ce.forward(&pred, (&labels).into(), &none).unwrap_err();
    assert!(
        format!("{e:#}").contains("2 target(s) out of range"),
        "{e:#}"
    );
    assert!(ce.forward_unfused(&pred, (&labels).into(), &none).is_err());
    let distances = Tensor::from_slice(&[0.5f32, 4.0, 3.99, -0.5]);
    let dfl = DistributionFocalLoss::default();
    let e = dfl.forward(&pred, (&distances).into(), &none).unwrap_err();
    assert!(
        format!("{e:#}").contains("2 target(s) out of range"),
        "{e:#}"
    );
    assert!(dfl
        .forward_unfused(&pred, (&distances).into(), &none)
        .is_err());
    with_emulated_device(EmulatedDevice::default(), || {
        for (loss, target) in [(&ce as &dyn Loss, &labels), (&dfl as &dyn Loss, &distances)] {
            let p = pred.detach().set_requires_grad(true);
            let l = loss.forward(&p, target.into(), &none).unwrap();
            let nan = Vec::<bool>::try_from(l.isnan()).unwrap();
            assert_eq!(nan, vec![false, true, false, true], "{}", loss.type_name());
            l.sum(Kind::Float).backward();
            let nan_rows = Vec::<bool>::try_from(p.grad().isnan().any_dim(1, false)).unwrap();
            assert_eq!(nan_rows, vec![false, true, false, true]);
        }
    });
}
