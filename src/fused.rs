//! The one place that runs a fused kernel: input checks, the argument block, dispatch to the
//! CPU or CUDA executor, and the autograd node whose backward is the fused backward pass.
//!
//! A loss module (focal.rs, ...) only says which kernel body, with which parameters and
//! MMDetection broadcasting, and hands its tensors here.

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::abi::{
    dtype_code, DlArgs, Pass, FLAG_ACTIVATED, FLAG_IOU_WEIGHTED, FLAG_ROW_SUM, FLAG_STRICT_LABELS,
    TARGET_DENSE, TARGET_LABELS, TARGET_LABELS_SCORES,
};
pub(crate) use crate::bodies::Body;
use crate::checks;
use crate::reduction::{check_avg_factor, AvgFactor, Reduction};

/// What a loss module asks of the executor.
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    pub body: Body,
    /// The MMDetection class name, for errors and the autograd node.
    pub name: &'static str,
    pub p0: f64,
    pub p1: f64,
    pub activated: bool,
    pub iou_weighted: bool,
    /// The loss of an anchor is the sum over its classes (QFL): 'none' gives (N,) and 'mean'
    /// divides by N.
    pub row_sum: bool,
    /// Labels must lie in [0, C] (C = background); otherwise anything outside [0, C) is background.
    pub strict_labels: bool,
    pub loss_weight: f64,
    pub reduction: Reduction,
}

/// The target as the kernels read it.
pub(crate) enum KTarget<'a> {
    /// (N, C), any floating kind (converted to pred's).
    Dense(&'a Tensor),
    /// Class indices (N,).
    Labels(&'a Tensor),
    /// Class indices and the score of each anchor's class (N,), (N,).
    LabelsScores(&'a Tensor, &'a Tensor),
}

/// Tensors prepared for the kernels, kept by the autograd node for the backward pass (the
/// pointers in `args` point into them).
struct Prepared {
    spec: Spec,
    args: DlArgs,
    kind: Kind,
    device: Device,
    executor: Executor,
    /// pred, target, score, weight and avg_factor as the kernels read them; the autograd node
    /// checks their version counters before its backward reads them.
    saved: Vec<Tensor>,
}

/// Where a pass runs. Chosen at forward time from the tensors' device (and, for CPU tensors in
/// tests, the emulated device switch) and kept for the backward pass.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Executor {
    /// The CPU executor (kernels/executor_host.h).
    Host,
    /// The device executor (kernels/kernels.cu) on a GPU.
    Cuda(usize),
    /// The device executor on the emulated device, over CPU tensors.
    Emulated(crate::emu::EmulatedDevice),
}

/// The accumulation kind of the kernels for an input kind.
fn acc_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

fn ptr(t: &Tensor) -> u64 {
    if t.numel() == 0 {
        0
    } else {
        t.data_ptr() as u64
    }
}

fn same_device(name: &str, what: &str, t: &Tensor, device: Device) -> Result<()> {
    ensure!(
        t.device() == device,
        "{name}: {what} is on {:?} but pred is on {:?}; move them to one device",
        t.device(),
        device
    );
    Ok(())
}

/// Runs the fused forward pass and records its backward. `weight` must already have the
/// loss's MMDetection shape handling applied; here it is broadcast (plain torch rules) against
/// (N, C) or, for row-sum losses, (N, 1).
pub(crate) fn run(
    spec: Spec,
    pred: &Tensor,
    target: KTarget<'_>,
    weight: Option<&Tensor>,
    avg_factor: Option<&AvgFactor>,
) -> Result<Tensor> {
    let name = spec.name;
    let p = prepare(spec, pred, target, weight, avg_factor)?;
    let out_shape: Vec<i64> = match (p.spec.reduction, p.spec.row_sum) {
        (Reduction::None, false) => vec![p.args.n, p.args.c],
        (Reduction::None, true) => vec![p.args.n],
        _ => vec![],
    };
    let out = Tensor::f_empty(out_shape.as_slice(), (p.kind, p.device))?;
    // On the CPU (compute-bound) the forward pass also writes the gradient, sharing the element
    // math; backward then only scales it. On CUDA (memory-bound) backward recomputes from pred,
    // which moves fewer bytes (forward: read N; backward: read N, write N).
    let mut grad_buf = if p.executor == Executor::Host
        && pred.requires_grad()
        && crate::autograd::grad_enabled()
    {
        Some(Tensor::f_empty([p.args.n, p.args.c], (p.kind, p.device))?)
    } else {
        None
    };
    let mut args = p.args;
    args.out = ptr(&out);
    args.grad_buf = grad_buf.as_ref().map_or(0, ptr);
    launch(&p, Pass::Forward, &mut args)?;

    let saved: Vec<Tensor> = p.saved.iter().map(Tensor::shallow_clone).collect();
    let saved: Vec<&Tensor> = saved.iter().collect();
    crate::autograd::record_saving(
        &format!("{name}Backward"),
        &[pred],
        &[&out],
        &saved,
        move |grads: &[Tensor]| {
            if crate::autograd::grad_enabled() {
                bail!(
                    "{name}: a backward with create_graph=true (double backward, a gradient \
                     penalty) is not supported by the fused kernels, whose gradient is not itself \
                     differentiable; use forward_unfused for a loss you differentiate twice"
                );
            }
            // The first backward takes the precomputed gradient; a later one (retain_graph) recomputes.
            let grad = match grad_buf.take() {
                Some(g) => scale_in_place(g, &grads[0], &p)?,
                None => backward(&p, &grads[0])?,
            };
            Ok(vec![Some(grad)])
        },
    )?;
    Ok(out)
}

fn prepare(
    spec: Spec,
    pred: &Tensor,
    target: KTarget<'_>,
    weight: Option<&Tensor>,
    avg_factor: Option<&AvgFactor>,
) -> Result<Prepared> {
    let name = spec.name;
    let kind = checks::floating(name, "pred", pred)?;
    let (n, c) = checks::pred_shape(name, pred)?;
    let device = pred.device();
    let reduction = spec.reduction;
    check_avg_factor(name, reduction, avg_factor)?;

    let executor = match device {
        Device::Cpu => crate::emu::current().map_or(Executor::Host, Executor::Emulated),
        Device::Cuda(ordinal) => Executor::Cuda(ordinal),
        d => bail!("{name}: pred is on {d:?}; only CPU and CUDA tensors are supported"),
    };
    let pred_c = pred.f_detach()?.f_contiguous()?;
    if spec.activated && executor == Executor::Host {
        // On CUDA the kernels give NaN there instead (no host read).
        checks::probabilities(name, &pred_c)?;
    }
    let mut args = DlArgs {
        pred: ptr(&pred_c),
        n,
        c,
        loss_weight: spec.loss_weight,
        p0: spec.p0,
        p1: spec.p1,
        reduction: reduction as i32,
        ..Default::default()
    };
    args.flags = (if spec.activated { FLAG_ACTIVATED } else { 0 })
        | (if spec.iou_weighted {
            FLAG_IOU_WEIGHTED
        } else {
            0
        })
        | (if spec.row_sum { FLAG_ROW_SUM } else { 0 })
        | (if spec.strict_labels {
            FLAG_STRICT_LABELS
        } else {
            0
        });

    let labels = |what: &str, t: &Tensor| -> Result<Tensor> {
        checks::integer(name, what, t)?;
        same_device(name, what, t, device)?;
        ensure!(
            t.dim() == 1 && t.size()[0] == n,
            "{name}: class-index {what} must be ({n},) for pred of shape {:?}, got {:?}",
            pred.size(),
            t.size()
        );
        Ok(t.f_detach()?.f_to_kind(Kind::Int64)?.f_contiguous()?)
    };
    let (target_t, score) = match target {
        KTarget::Dense(t) => {
            checks::real(name, "target", t)?;
            same_device(name, "target", t, device)?;
            ensure!(
                t.size() == pred.size(),
                "{name}: target must have pred's shape {:?}, got {:?}",
                pred.size(),
                t.size()
            );
            args.target_mode = TARGET_DENSE;
            (t.f_detach()?.f_to_kind(kind)?.f_contiguous()?, None)
        }
        KTarget::Labels(t) => {
            args.target_mode = TARGET_LABELS;
            (labels("target", t)?, None)
        }
        KTarget::LabelsScores(l, s) => {
            args.target_mode = TARGET_LABELS_SCORES;
            let l = labels("labels", l)?;
            checks::floating(name, "scores", s)?;
            same_device(name, "scores", s, device)?;
            ensure!(
                s.dim() == 1 && s.size()[0] == n,
                "{name}: scores must be ({n},), got {:?}",
                s.size()
            );
            (l, Some(s.f_detach()?.f_to_kind(kind)?.f_contiguous()?))
        }
    };
    args.target = ptr(&target_t);
    args.score = score.as_ref().map_or(0, ptr);

    let weight = match weight {
        None => None,
        Some(w) => {
            checks::real(name, "weight", w)?;
            same_device(name, "weight", w, device)?;
            let shape: Vec<i64> = if spec.row_sum { vec![n, 1] } else { vec![n, c] };
            let w = w.f_detach()?.f_to_kind(kind)?;
            let e = w.f_expand(shape.as_slice(), false).map_err(|_| {
                anyhow::anyhow!(
                    "{name}: weight of shape {:?} does not broadcast against the loss of shape {:?}",
                    w.size(),
                    if spec.row_sum { vec![n] } else { vec![n, c] }
                )
            })?;
            // The kernels take a row stride and a column stride of 0 or 1.
            let e = if e.stride()[1] == 0 || e.stride()[1] == 1 || e.size()[1] <= 1 {
                e
            } else {
                e.f_contiguous()?
            };
            let st = e.stride();
            args.w_sn = st[0];
            args.w_sc = if e.size()[1] <= 1 { 0 } else { st[1] };
            args.weight = ptr(&e);
            if args.weight == 0 && n * c > 0 {
                bail!("{name}: empty weight for a non-empty loss");
            }
            Some(e)
        }
    };

    let avg_factor = match (reduction, avg_factor) {
        (Reduction::Mean, Some(AvgFactor::Value(v))) => {
            args.has_avg_factor = 1;
            args.avg_factor_value = *v;
            None
        }
        (Reduction::Mean, Some(AvgFactor::Tensor(t))) => {
            let t = t
                .f_detach()?
                .f_to_device(device)?
                .f_to_kind(acc_kind(kind))?
                .f_reshape([1])?
                .f_contiguous()?;
            args.has_avg_factor = 2;
            args.avg_factor = ptr(&t);
            Some(t)
        }
        _ => None, // 'none' ignores avg_factor, as MMDetection does
    };

    let saved = [Some(pred_c), Some(target_t), score, weight, avg_factor]
        .into_iter()
        .flatten()
        .collect();
    Ok(Prepared {
        spec,
        args,
        kind,
        device,
        executor,
        saved,
    })
}

/// The precomputed d(result)/d(pred) times the upstream gradient (CPU only: reading the scalar
/// is free there, and the common upstream of exactly 1 costs nothing).
fn scale_in_place(mut g: Tensor, upstream: &Tensor, p: &Prepared) -> Result<Tensor> {
    if upstream.dim() == 0 {
        let s = upstream.f_double_value(&[])?;
        if s != 1.0 {
            let _ = g.f_mul_scalar_(s)?;
        }
    } else {
        let up = upstream.f_to_kind(p.kind)?;
        let up = if p.spec.row_sum {
            up.f_unsqueeze(1)?
        } else {
            up
        };
        let _ = g.f_mul_(&up)?;
    }
    Ok(g)
}

fn backward(p: &Prepared, grad: &Tensor) -> Result<Tensor> {
    let name = p.spec.name;
    let grad = grad
        .f_to_kind(p.kind)?
        .f_to_device(p.device)?
        .f_contiguous()?;
    let out = Tensor::f_empty([p.args.n, p.args.c], (p.kind, p.device))?;
    // `args` points into the saved tensors, which the node keeps alive.
    let mut args = p.args;
    args.grad_out = ptr(&grad);
    args.out = ptr(&out);
    (args.g_sn, args.g_sc) = match (p.spec.reduction, p.spec.row_sum) {
        (Reduction::None, false) => (p.args.c, 1),
        (Reduction::None, true) => (1, 0),
        _ => (0, 0),
    };
    launch(p, Pass::Backward, &mut args).with_context(|| format!("{name} backward"))?;
    Ok(out)
}

/// NaNs after the per-block partials on the emulated device.
const EMULATED_CANARY: i64 = 64;

fn launch(p: &Prepared, pass: Pass, args: &mut DlArgs) -> Result<()> {
    let name = p.spec.name;
    let Some(dtype) = dtype_code(p.kind) else {
        bail!("{name}: no kernels for {:?}", p.kind);
    };
    let geometry = match p.executor {
        Executor::Host => {
            let bad = crate::host::run(p.spec.body, pass as i32, dtype, args)
                .with_context(|| format!("{name}: CPU kernel"))?;
            if bad > 0 {
                bail!(
                    "{name}: {bad} class-index target(s) outside [0, {c}] (0..{c} are classes, {c} is background)",
                    c = args.c
                );
            }
            return Ok(());
        }
        Executor::Cuda(_) => crate::launch::Geometry::default(),
        Executor::Emulated(e) => e.geometry(),
    };
    let plan = crate::launch::plan(p.spec.body, pass, p.kind, args, geometry);
    // The per-block partials of a reduction. On CUDA the buffer goes back to the caching
    // allocator when dropped, which orders its reuse on torch's current stream, the one we
    // launch on; the emulated device runs synchronously.
    let _partials = match &plan.finalize {
        Some((_, n)) => {
            let opts = (acc_kind(p.kind), p.device);
            let t = match p.executor {
                // On the emulated device NaNs follow the partials, so that a kernel that reads
                // past them gives a NaN loss rather than a plausible one.
                Executor::Emulated(_) => Tensor::f_full([*n + EMULATED_CANARY], f64::NAN, opts)?,
                _ => Tensor::f_empty([*n], opts)?,
            };
            args.partials = ptr(&t);
            args.n_partials = *n as i32;
            Some(t)
        }
        None => None,
    };
    let run = |kernel: &str, blocks: u32, args: &DlArgs| match p.executor {
        Executor::Cuda(ordinal) => crate::cuda::run_kernel(ordinal, kernel, blocks, args),
        Executor::Emulated(e) => crate::emu::run_kernel(kernel, blocks, args, e.reverse),
        Executor::Host => bail!("the host executor has no device kernels"),
    };
    let context = |what: &str| format!("{name}: {what} kernel");
    if plan.finalize.is_some() || args.n * args.c > 0 {
        run(&plan.kernel, plan.blocks, args).with_context(|| context("device"))?;
    }
    if let Some((finalize, _)) = &plan.finalize {
        run(finalize, 1, args).with_context(|| context("device finalize"))?;
    }
    Ok(())
}
