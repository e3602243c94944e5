use tch::{Device, Kind, Tensor};
use tch_detloss::{registry, LossArgs};

fn main() -> anyhow::Result<()> {
    let device = Device::cuda_if_available();
    // The config dict an MMDetection user writes, as JSON.
    let loss = registry::build_str(
        r#"{"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0}"#,
    )?;

    let cls_score = Tensor::randn([20_000, 80], (Kind::Float, device)).set_requires_grad(true);
    let labels = Tensor::randint(81, [20_000], (Kind::Int64, device)); // 80 = background
    let label_weights = Tensor::ones([20_000], (Kind::Float, device));
    let num_pos = labels.lt(80).sum(Kind::Float).clamp_min(1.0); // stays on the device

    // loss(pred, target, weight=label_weights, avg_factor=num_pos)
    let args = LossArgs::new().weight(&label_weights).avg_factor(&num_pos);
    let l = loss.forward(&cls_score, (&labels).into(), &args)?;
    l.backward(); // one light pass
    println!("FocalLoss on {device:?}: {:.6}", l.double_value(&[]));
    Ok(())
}
