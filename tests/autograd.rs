//! The autograd bridge (`tch_detloss::autograd`): gradients flow through a custom function, its
//! state is freed, nothing grows over many steps, and every failure in backward is an error.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};
use tch_detloss::autograd::{self, live_nodes};
use tch_detloss::losses::FocalLoss;
use tch_detloss::{Loss, LossArgs};

/// live_nodes() is process-wide: tests that count it run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// y = x^3 by hand, backward 3 x^2 dy; `calls` counts backward calls.
fn cube(x: &Tensor, calls: Arc<AtomicUsize>) -> Tensor {
    let y = tch::no_grad(|| x * x * x);
    let saved = x.detach();
    let recorded = autograd::record("CubeBackward", &[x], &[&y], move |g: &[Tensor]| {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok(vec![Some(&g[0] * 3.0 * &saved * &saved)])
    })
    .unwrap();
    assert!(recorded);
    y
}

#[test]
fn gradient_flows_through_a_custom_function() {
    let _g = serial();
    let x = Tensor::from_slice(&[1.0f64, -2.0, 0.5]).set_requires_grad(true);
    let calls = Arc::new(AtomicUsize::new(0));
    // Composed with stock ops on both sides.
    let y = cube(&(&x * 2.0), calls.clone());
    (y.sin().sum(Kind::Double)).backward();
    let x2 = x.detach().set_requires_grad(true);
    ((&x2 * 2.0).pow_tensor_scalar(3).sin().sum(Kind::Double)).backward();
    assert!(
        x.grad().allclose(&x2.grad(), 1e-12, 1e-12, false),
        "{} vs {}",
        x.grad(),
        x2.grad()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn state_is_freed_after_backward_and_when_the_graph_dies() {
    let _g = serial();
    let base = live_nodes();
    let x = Tensor::from_slice(&[1.0f64, 2.0]).set_requires_grad(true);
    let y = cube(&x, Arc::default());
    assert_eq!(live_nodes(), base + 1);
    y.sum(Kind::Double).backward();
    assert_eq!(
        live_nodes(),
        base,
        "released after a backward without retain_graph"
    );

    let y = cube(&x, Arc::default());
    assert_eq!(live_nodes(), base + 1);
    drop(y);
    assert_eq!(live_nodes(), base, "freed with its graph");

    // Nothing is recorded (and the closure is dropped) when no input requires grad.
    let z = Tensor::from_slice(&[1.0f64]);
    let out = z.shallow_clone() * 1.0;
    let rec = autograd::record("Nothing", &[&z], &[&out], |_: &[Tensor]| Ok(vec![None])).unwrap();
    assert!(!rec);
    assert_eq!(live_nodes(), base);
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn no_growth_over_ten_thousand_steps() {
    let _g = serial();
    let base = live_nodes();
    let loss = FocalLoss::default();
    let labels = Tensor::from_slice(&[0i64, 3, 1, 2, 3, 0, 1, 3]);
    let w = Tensor::ones([8], (Kind::Float, Device::Cpu));
    let step = |i: i64| {
        let pred = (Tensor::arange(32, (Kind::Float, Device::Cpu)).reshape([8, 4])
            / (i % 7 + 1) as f64
            - 2.0)
            .set_requires_grad(true);
        let l = loss
            .forward(
                &pred,
                (&labels).into(),
                &LossArgs::new().weight(&w).avg_factor(3.0),
            )
            .unwrap();
        l.backward();
        assert!(pred.grad().isfinite().all().int64_value(&[]) == 1);
    };
    for i in 0..1000 {
        step(i);
    }
    let before = rss_bytes();
    for i in 0..10_000 {
        step(i);
    }
    let grown = rss_bytes().saturating_sub(before);
    assert_eq!(live_nodes(), base, "every node freed");
    assert!(
        grown < 8 << 20,
        "resident memory grew by {grown} bytes over 10,000 steps"
    );
}

fn backward_error(
    f: impl FnMut(&[Tensor]) -> anyhow::Result<Vec<Option<Tensor>>> + Send + 'static,
) -> String {
    let x = Tensor::from_slice(&[1.0f64, 2.0]).set_requires_grad(true);
    let y = tch::no_grad(|| &x * 2.0);
    autograd::record("FailingBackward", &[&x], &[&y], f).unwrap();
    let e = y
        .sum(Kind::Double)
        .f_backward()
        .expect_err("backward must fail");
    e.to_string()
}

#[test]
fn failures_in_backward_are_errors() {
    let _g = serial();
    let base = live_nodes();
    let e = backward_error(|_| panic!("boom"));
    assert!(e.contains("panic in backward: boom"), "{e}");
    let e = backward_error(|_| anyhow::bail!("no gradient today"));
    assert!(e.contains("no gradient today"), "{e}");
    let e = backward_error(|_| Ok(vec![Some(Tensor::zeros([3], (Kind::Double, Device::Cpu)))]));
    assert!(e.contains("invalid gradient") || e.contains("shape"), "{e}");
    let e = backward_error(|_| Ok(vec![]));
    assert!(e.contains("0 gradients for 1 inputs"), "{e}");
    assert_eq!(live_nodes(), base, "failed nodes are freed too");
}

#[test]
fn second_backward_is_an_error_unless_the_graph_is_retained() {
    let _g = serial();
    let x = Tensor::from_slice(&[1.0f64, 2.0]).set_requires_grad(true);
    let y = cube(&x, Arc::default()).sum(Kind::Double);
    y.backward();
    let e = y.f_backward().expect_err("second backward").to_string();
    assert!(e.contains("second time"), "{e}");

    // With retain_graph the node runs again and gradients accumulate.
    let x = Tensor::from_slice(&[1.0f64, 2.0]).set_requires_grad(true);
    let calls = Arc::new(AtomicUsize::new(0));
    let y = cube(&x, calls.clone()).sum(Kind::Double);
    Tensor::run_backward(&[&y], &[&x], true, false);
    y.backward();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The fused loss behaves the same.
    let pred = Tensor::randn([4, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3]);
    let l = FocalLoss::default()
        .forward(&pred, (&labels).into(), &LossArgs::new())
        .unwrap();
    l.backward();
    let e = l.f_backward().expect_err("second backward").to_string();
    assert!(e.contains("FocalLossBackward"), "{e}");
}
