//! Runs MMDetection reference cases (the `mmdet_cases.json` format of `tests/data/README.md`)
//! through the public config API: build the loss from the case's config dict, call it with the
//! case's inputs, and compare the loss and the gradient of its sum with MMDetection's.
//!
//! `cargo run --release --example golden -- FILE` prints a report; the test suite asserts that
//! every case of every shipped loss passes.

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::{registry, AvgFactor, LossArgs, Reduction, Target};

/// A tensor as the case file stores it.
#[derive(Clone, Debug, Deserialize)]
pub struct CaseTensor {
    /// Its shape.
    pub shape: Vec<i64>,
    /// `float64`, `float32` or `int64`.
    pub dtype: String,
    /// Row-major values.
    pub data: Vec<f64>,
}

impl CaseTensor {
    /// The tensor, on the CPU.
    pub fn to_tensor(&self) -> Result<Tensor> {
        let t = Tensor::from_slice(&self.data)
            .f_reshape(self.shape.as_slice())
            .with_context(|| format!("{} values for shape {:?}", self.data.len(), self.shape))?;
        Ok(match self.dtype.as_str() {
            "float64" => t,
            "float32" => t.to_kind(Kind::Float),
            "int64" => t.to_kind(Kind::Int64),
            d => bail!("unknown dtype {d}"),
        })
    }
}

/// One reference case.
#[derive(Clone, Debug, Deserialize)]
pub struct Case {
    /// Its name.
    pub name: String,
    /// The MMDetection class.
    pub loss: String,
    /// The config dict.
    pub config: Value,
    /// The call's arguments.
    pub call: Value,
    /// Named inputs (`pred`, `target`, ...).
    pub inputs: serde_json::Map<String, Value>,
    /// `loss` and `grad_pred` (absent for error cases).
    #[serde(default)]
    pub outputs: Option<serde_json::Map<String, Value>>,
    /// Successive calls on one loss object (stateful losses).
    #[serde(default)]
    pub sequence: Option<Vec<Value>>,
    /// What MMDetection's backward raised, where it raises (MarginL2Loss on float64).
    #[serde(default)]
    pub grad_error: Option<Value>,
    /// The state after the call (stateful losses called once).
    #[serde(default)]
    pub state_after: Option<serde_json::Map<String, Value>>,
    /// What MMDetection raised (error cases).
    #[serde(default)]
    pub error: Option<Value>,
}

/// A whole case file.
#[derive(Clone, Debug, Deserialize)]
pub struct CaseFile {
    /// Cases with outputs.
    pub cases: Vec<Case>,
    /// Cases that MMDetection rejects.
    #[serde(default)]
    pub error_cases: Vec<Case>,
}

impl CaseFile {
    /// Reads a case file.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// How one case went.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Loss and gradient within tolerance; the worst relative errors.
    Pass {
        /// Of the loss.
        loss_err: f64,
        /// Of the gradient.
        grad_err: f64,
    },
    /// An expected error was raised; its message.
    Rejected(String),
    /// Wrong result, or an unexpected error.
    Fail(String),
    /// The loss type is not registered (yet).
    Unsupported,
}

/// The error of `got` against `want`, relative to `want`'s largest magnitude.
pub fn rel_err(got: &Tensor, want: &Tensor) -> Result<f64> {
    if got.size() != want.size() {
        bail!("shape {:?}, expected {:?}", got.size(), want.size());
    }
    if want.numel() == 0 {
        return Ok(0.0);
    }
    let got = got.to_kind(Kind::Double);
    let want = want.to_kind(Kind::Double);
    // NaN in the same places counts as equal.
    let both_nan = got.isnan().logical_and(&want.isnan());
    let diff = (&got - &want).abs().masked_fill(&both_nan, 0.0);
    let scale = want
        .abs()
        .masked_fill(&want.isnan(), 0.0)
        .max()
        .double_value(&[])
        .max(f64::MIN_POSITIVE);
    let d = diff.max().double_value(&[]);
    Ok(if d.is_nan() { f64::INFINITY } else { d / scale })
}

fn input(inputs: &serde_json::Map<String, Value>, key: &str) -> Result<Option<Tensor>> {
    match inputs.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => Ok(Some(
            serde_json::from_value::<CaseTensor>(v.clone())?.to_tensor()?,
        )),
    }
}

/// A call's named parts and the gradient of their sum (or the error its backward raised).
type Called = (Vec<(String, Tensor)>, Result<Grads>);

/// Calls the loss on one set of inputs; returns its named parts (one `loss` for most losses)
/// and the gradient of the sum of all their elements (pred's, and the target's with
/// `grad_target`), or the error its backward raised.
fn call(
    loss: &dyn crate::Loss,
    call: &Value,
    inputs: &serde_json::Map<String, Value>,
    grad_target: bool,
) -> Result<Called> {
    let pred = input(inputs, "pred")?
        .ok_or_else(|| anyhow!("no pred"))?
        .set_requires_grad(true);
    // `loss(pred.clone(), ...)`: a non-leaf copy, which a loss may change in place (L2Loss).
    let cloned = call
        .get("python")
        .and_then(Value::as_str)
        .is_some_and(|p| p.contains("pred.clone()"));
    let pred_arg = if cloned {
        pred.copy()
    } else {
        pred.shallow_clone()
    };
    let target = input(inputs, "target")?.ok_or_else(|| anyhow!("no target"))?;
    // Where the case records the target's gradient (KD's soft labels, AE's bottom-right
    // embeddings), it is compared too.
    let target = if target.is_floating_point() && grad_target {
        target.set_requires_grad(true)
    } else {
        target
    };
    let score = input(inputs, "score")?;
    // GHM's `label_weight` and Seesaw's `label_weights` are the weight argument of their calls.
    let weight = ["weight", "label_weight", "label_weights"]
        .iter()
        .find_map(|k| call.get(*k).and_then(Value::as_str))
        .map(|r| input(inputs, r.trim_start_matches("inputs.")))
        .transpose()?
        .flatten();
    // GaussianFocalLoss's positives.
    let named = |key: &str| -> Result<Option<Tensor>> {
        match call.get(key).and_then(Value::as_str) {
            Some(r) => input(inputs, r.trim_start_matches("inputs.")),
            None => Ok(None),
        }
    };
    let (pos_inds, pos_labels) = (named("pos_inds")?, named("pos_labels")?);
    let mut args = LossArgs::new();
    if let Some(w) = &weight {
        args = args.weight(w);
    }
    args.pos_inds = pos_inds.as_ref();
    args.pos_labels = pos_labels.as_ref();
    if let Some(af) = call.get("avg_factor").and_then(Value::as_f64) {
        args = args.avg_factor(AvgFactor::Value(af));
    }
    if let Some(r) = call.get("reduction_override").and_then(Value::as_str) {
        args = args.reduction(r.parse::<Reduction>()?);
    }
    if let Some(i) = call.get("ignore_index").and_then(Value::as_i64) {
        args = args.ignore_index(i);
    }
    // AssociativeEmbeddingLoss's `match`, the third positional argument.
    let corner_match = call
        .get("positional")
        .and_then(|p| p.get(2))
        .filter(|m| m.is_array())
        .map(|m| serde_json::from_value::<Vec<crate::losses::ae::ImageMatch>>(m.clone()))
        .transpose()?;
    if let Some(m) = &corner_match {
        args = args.corner_match(m);
    }
    let target_arg = match &score {
        Some(s) => Target::LabelsScores {
            labels: &target,
            scores: s,
        },
        None => Target::Tensor(&target),
    };
    let parts = loss.forward_parts(&pred_arg, target_arg, &args)?;
    let sums = parts
        .iter()
        .map(|(_, t)| t.f_sum(Kind::Double))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let total = crate::losses::sum_in_order(sums)?;
    let backward = match total {
        Some(total) if total.requires_grad() => total.f_backward().map_err(anyhow::Error::from),
        _ => Ok(()),
    };
    let grad_of = |t: &Tensor| -> Result<Tensor> {
        Ok(if t.grad().defined() {
            t.grad()
        } else {
            t.f_zeros_like()?
        })
    };
    let grads = backward.and_then(|_| {
        Ok(Grads {
            pred: grad_of(&pred)?,
            target: if target.requires_grad() {
                Some(grad_of(&target)?)
            } else {
                None
            },
        })
    });
    Ok((
        parts.into_iter().map(|(k, t)| (k, t.detach())).collect(),
        grads,
    ))
}

/// The gradients of a call: pred's, and the target's where it was asked for.
struct Grads {
    pred: Tensor,
    target: Option<Tensor>,
}

fn tolerance(loss: &str, outputs: &serde_json::Map<String, Value>) -> f64 {
    // MMDetection computes some losses in float32 even for float64 inputs (README): the BCE of
    // CrossEntropyLoss's sigmoid form (a float32 output) and GHMC's (float32 elements times
    // float64 weights).
    let f32_loss = outputs
        .iter()
        .filter(|(k, _)| !k.starts_with("grad") && !k.starts_with("get_"))
        .any(|(_, v)| v.get("dtype").and_then(Value::as_str) == Some("float32"));
    if f32_loss || loss == "GHMC" {
        1e-6
    } else {
        1e-10
    }
}

fn check(
    loss: &dyn crate::Loss,
    call_v: &Value,
    inputs: &serde_json::Map<String, Value>,
    outputs: &serde_json::Map<String, Value>,
    state_after: Option<&serde_json::Map<String, Value>>,
    grad_error: Option<&Value>,
) -> Result<(f64, f64)> {
    let (parts, grads) = call(loss, call_v, inputs, outputs.contains_key("grad_target"))?;
    let tol = tolerance(loss.type_name(), outputs);
    let mut le = 0f64;
    for (name, got) in &parts {
        let want = input(outputs, name)?.ok_or_else(|| anyhow!("the case has no output {name}"))?;
        le = le.max(rel_err(got, &want).with_context(|| name.clone())?);
    }
    let ge = match (input(outputs, "grad_pred")?, grad_error) {
        (Some(want_grad), _) => {
            let grads = grads?;
            let mut e = rel_err(&grads.pred, &want_grad).context("grad")?;
            if let Some(want) = input(outputs, "grad_target")? {
                let got = grads
                    .target
                    .ok_or_else(|| anyhow!("the target has no gradient"))?;
                e = e.max(rel_err(&got, &want).context("grad_target")?);
            }
            e
        }
        // MMDetection's backward raises here (MarginL2Loss's mixed-dtype mse_loss on float64):
        // there is no reference gradient, the loss alone is compared.
        (None, Some(_)) => 0.0,
        (None, None) => bail!("case has no grad_pred"),
    };
    if !(le <= tol && ge <= tol) {
        bail!("loss error {le:.3e}, grad error {ge:.3e} (tolerance {tol:.0e})");
    }
    // The state after the call (GHM's acc_sum: float32 arithmetic on both sides, exact).
    if let Some(expected) = state_after {
        let state = loss.state()?;
        for (key, _) in expected {
            let want = input(expected, key)?.ok_or_else(|| anyhow!("state {key} is null"))?;
            let got = state
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, t)| t.to_device(tch::Device::Cpu))
                .ok_or_else(|| anyhow!("the loss has no state {key}"))?;
            let err = rel_err(&got, &want).with_context(|| format!("state {key}"))?;
            if err > 0.0 {
                bail!("state {key} off by {err:.3e}: {got:?}");
            }
        }
    }
    Ok((le, ge))
}

/// One call of a case: its call arguments, inputs, expected outputs and state after the call.
type Step = (
    Value,
    serde_json::Map<String, Value>,
    serde_json::Map<String, Value>,
    Option<serde_json::Map<String, Value>>,
);

/// The loss types whose cases [`run_case`] runs: the registered ones and DDQAuxLoss, which
/// MMDetection does not register either.
pub fn shipped_types() -> Vec<String> {
    let mut types = registry::registered_types();
    types.push(crate::losses::ddq_detr_aux::NAME.to_string());
    types
}

/// Runs one case.
pub fn run_case(case: &Case) -> Outcome {
    if case.loss == crate::losses::ddq_detr_aux::NAME {
        return run_ddq_case(case).unwrap_or_else(|e| Outcome::Fail(format!("{e:#}")));
    }
    if !registry::registered_types().contains(&case.loss) {
        return Outcome::Unsupported;
    }
    let result = (|| -> Result<Outcome> {
        let loss = registry::build(&case.config);
        if let Some(err) = &case.error {
            let expected = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            // A case without inputs is a constructor error: the build itself must fail.
            if case.inputs.is_empty() {
                return Ok(match loss {
                    Err(e) => Outcome::Rejected(format!("{e:#}")),
                    Ok(_) => Outcome::Fail(format!(
                        "built a config that MMDetection rejects ({expected})"
                    )),
                });
            }
            let outcome = loss.and_then(|l| call(l.as_ref(), &case.call, &case.inputs, false));
            return Ok(match outcome {
                Err(e) => Outcome::Rejected(format!("{e:#}")),
                Ok(_) => Outcome::Fail(format!(
                    "accepted an input that MMDetection rejects ({expected})"
                )),
            });
        }
        let loss = loss?;
        // A case of `get_activation` alone (EQLV2Loss's).
        if let Some(out) = case
            .outputs
            .as_ref()
            .filter(|o| o.contains_key("activation") && !o.contains_key("grad_pred"))
        {
            let want = input(out, "activation")?.ok_or_else(|| anyhow!("activation is null"))?;
            let pred = input(&case.inputs, "pred")?.ok_or_else(|| anyhow!("no pred"))?;
            let got = loss
                .get_activation(&pred)?
                .ok_or_else(|| anyhow!("the loss has no get_activation"))?;
            let err = rel_err(&got, &want).context("activation")?;
            if err > 1e-10 {
                bail!("activation off by {err:.3e}");
            }
            return Ok(Outcome::Pass {
                loss_err: err,
                grad_err: 0.0,
            });
        }
        // EQLV2Loss's use_distributed: a one-process gloo group, as the case was made with.
        let _group = if case.config.get("use_distributed") == Some(&Value::Bool(true)) {
            Some(OneProcessGroup::new()?)
        } else {
            None
        };
        let steps: Vec<Step> = match &case.sequence {
            Some(seq) => seq
                .iter()
                .map(|s| {
                    let obj = |k: &str| {
                        s.get(k)
                            .and_then(Value::as_object)
                            .cloned()
                            .ok_or_else(|| anyhow!("sequence step without {k}"))
                    };
                    Ok((
                        s.get("call").cloned().unwrap_or_else(|| case.call.clone()),
                        obj("inputs")?,
                        obj("outputs")?,
                        obj("state_after").ok(),
                    ))
                })
                .collect::<Result<_>>()?,
            None => vec![(
                case.call.clone(),
                case.inputs.clone(),
                case.outputs.clone().ok_or_else(|| anyhow!("no outputs"))?,
                case.state_after.clone(),
            )],
        };
        let (mut le, mut ge) = (0f64, 0f64);
        for (i, (c, inp, out, state)) in steps.iter().enumerate() {
            let (l, g) = check(
                loss.as_ref(),
                c,
                inp,
                out,
                state.as_ref(),
                case.grad_error.as_ref(),
            )
            .with_context(|| format!("call {}", i + 1))?;
            le = le.max(l);
            ge = ge.max(g);
        }
        Ok(Outcome::Pass {
            loss_err: le,
            grad_err: ge,
        })
    })();
    result.unwrap_or_else(|e| Outcome::Fail(format!("{e:#}")))
}

/// A DDQAuxLoss case: MMDetection does not register the loss, so the case's config builds it
/// directly (and the registry must reject it, as MMDetection's); its call is `loss.loss(...)`,
/// whose per-image lists, gradients and `get_targets` are compared.
fn run_ddq_case(case: &Case) -> Result<Outcome> {
    use crate::losses::DDQAuxLoss;
    let inputs = &case.inputs;
    if let Some(err) = &case.error {
        let expected = err.get("message").and_then(Value::as_str).unwrap_or("");
        let outcome = if inputs.is_empty() {
            registry::build(&case.config).map(|_| ())
        } else {
            DDQAuxLoss::from_config(&case.config).and_then(|l| ddq_call(&l, case).map(|_| ()))
        };
        return Ok(match outcome {
            Err(e) => Outcome::Rejected(format!("{e:#}")),
            Ok(()) => Outcome::Fail(format!("accepted what MMDetection rejects ({expected})")),
        });
    }
    let loss = DDQAuxLoss::from_config(&case.config)?;
    let outputs = case.outputs.as_ref().ok_or_else(|| anyhow!("no outputs"))?;
    let (parts, targets, pred, boxes) = ddq_call(&loss, case)?;
    let tol = 1e-6; // float32 only
    let (mut le, mut ge) = (0f64, 0f64);
    let want = |k: &str| input(outputs, k)?.ok_or_else(|| anyhow!("the case has no {k}"));
    // Both leaves' gradients, zeros where the loss does not reach one (the cls loss and boxes).
    let grads = |of: &Tensor, keep: bool| -> Result<Vec<Tensor>> {
        let g = Tensor::f_run_backward(&[of], &[&pred, &boxes], keep, false)?;
        g.into_iter()
            .zip([&pred, &boxes])
            .map(|(g, leaf)| Ok(if g.defined() { g } else { leaf.f_zeros_like()? }))
            .collect()
    };
    for (name, got) in &parts {
        le = le.max(rel_err(got, &want(name)?).with_context(|| name.clone())?);
        let g = grads(got, true)?;
        for (which, g) in ["pred", "bbox_preds"].iter().zip(&g) {
            let key = format!("grad_{which}.{name}");
            ge = ge.max(rel_err(g, &want(&key)?).context(key)?);
        }
    }
    let total = crate::losses::sum_in_order(parts.iter().map(|(_, t)| t.shallow_clone()))?
        .ok_or_else(|| anyhow!("no loss"))?;
    let g = grads(&total, false)?;
    for (which, g) in ["pred", "bbox_preds"].iter().zip(&g) {
        let key = format!("grad_{which}");
        ge = ge.max(rel_err(g, &want(&key)?).context(key)?);
    }
    for (i, t) in targets.iter().enumerate() {
        for (field, got) in [
            ("labels", &t.labels),
            ("label_weights", &t.label_weights),
            ("bbox_targets", &t.bbox_targets),
            ("alignment_metrics", &t.alignment_metrics),
        ] {
            let key = format!("get_targets.{field}.img{i}");
            le = le.max(rel_err(got, &want(&key)?).context(key)?);
        }
    }
    if !(le <= tol && ge <= tol) {
        bail!("loss error {le:.3e}, grad error {ge:.3e} (tolerance {tol:.0e})");
    }
    Ok(Outcome::Pass {
        loss_err: le,
        grad_err: ge,
    })
}

/// DDQAuxLoss's per-image losses named as the case's outputs, its targets, and the two leaves.
type DdqCalled = (
    Vec<(String, Tensor)>,
    Vec<crate::losses::DDQAuxTargets>,
    Tensor,
    Tensor,
);

fn ddq_call(loss: &crate::losses::DDQAuxLoss, case: &Case) -> Result<DdqCalled> {
    let inputs = &case.inputs;
    let leaf = |k: &str| -> Result<Tensor> {
        Ok(input(inputs, k)?
            .ok_or_else(|| anyhow!("no {k}"))?
            .set_requires_grad(true))
    };
    let (pred, boxes) = (leaf("pred")?, leaf("bbox_preds")?);
    let n = inputs
        .keys()
        .filter(|k| k.starts_with("gt_bboxes.img"))
        .count();
    let per_image = |stem: &str| -> Result<Vec<Tensor>> {
        (0..n)
            .map(|i| {
                input(inputs, &format!("{stem}.img{i}"))?.ok_or_else(|| anyhow!("no {stem}.img{i}"))
            })
            .collect()
    };
    let (gt_bboxes, gt_labels) = (per_image("gt_bboxes")?, per_image("gt_labels")?);
    let shapes: Vec<(i64, i64)> = case
        .call
        .get("positional")
        .and_then(|p| p.get(4))
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("no img_metas"))?
        .iter()
        .map(|m| {
            let s = m.get("img_shape").and_then(Value::as_array);
            let at = |k: usize| s.and_then(|s| s.get(k)).and_then(Value::as_i64);
            at(0)
                .zip(at(1))
                .ok_or_else(|| anyhow!("img_meta without img_shape: {m}"))
        })
        .collect::<Result<_>>()?;
    let out = loss.loss(&pred, &boxes, &gt_bboxes, &gt_labels, &shapes)?;
    let targets = loss.get_targets(&pred, &boxes, &gt_bboxes, &gt_labels, &shapes)?;
    let mut parts = Vec::new();
    for (stem, list) in [
        ("aux_loss_cls", out.aux_loss_cls),
        ("aux_loss_bbox", out.aux_loss_bbox),
    ] {
        for (i, t) in list.into_iter().enumerate() {
            parts.push((format!("{stem}.img{i}"), t));
        }
    }
    Ok((parts, targets, pred, boxes))
}

/// A default process group of one process over loopback gloo, for the time it is held; the
/// cases that need one run one at a time.
struct OneProcessGroup {
    _serial: std::sync::MutexGuard<'static, ()>,
}

static ONE_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl OneProcessGroup {
    fn new() -> Result<Self> {
        use crate::dist::{self, GroupOptions, ProcessGroup, Store};
        let serial = ONE_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
        if dist::is_initialized() {
            bail!("a default process group is set up already");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let timeout = std::time::Duration::from_secs(20);
        let store = Store::tcp("127.0.0.1", port, 1, true, timeout)?;
        let options = GroupOptions {
            gloo_host: Some("127.0.0.1".into()),
            timeout,
            ..Default::default()
        };
        dist::set_default_group(ProcessGroup::new(&store, 0, 1, &options)?)?;
        Ok(Self { _serial: serial })
    }
}

impl Drop for OneProcessGroup {
    fn drop(&mut self) {
        crate::dist::destroy_process_group();
    }
}
