//! The one place that runs a fused kernel: input checks, the argument block, dispatch to the
//! CPU or CUDA executor, and the autograd node whose backward is the fused backward pass.
//!
//! A loss module (focal.rs, ...) only says which kernel body, with which parameters and
//! MMDetection broadcasting, and hands its tensors here.

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

pub(crate) use crate::abi::Shape;
use crate::abi::{
    dtype_code, DlArgs, Pass, AVG_COUNT_VALID, AVG_TENSOR, AVG_VALUE, FLAG_ACTIVATED, FLAG_ROW_SUM,
    FLAG_SHORTCUT, MAX_BINS, SCAN_STATS, SLOTS_WITH_COUNT, SLOTS_WITH_SHORTCUT, TARGET_DENSE,
    TARGET_LABELS, TARGET_LABELS_SCORES, TARGET_ROW_VALUE,
};
pub(crate) use crate::bodies::Body;
use crate::checks;
use crate::reduction::{check_avg_factor, AvgFactor, Reduction};

/// What a loss module asks of the executor.
#[derive(Debug)]
pub(crate) struct Spec {
    pub body: Body,
    /// The MMDetection class name, for errors and the autograd node.
    pub name: &'static str,
    /// Which executor runs the body.
    pub shape: Shape,
    /// The body's parameter slots p0..p3, as its kernel body documents them.
    pub params: [f64; 4],
    /// The body's integer slot i0.
    pub int_param: i64,
    /// `FLAG_*` bits. Row bodies and FLAG_ROW_SUM give one loss per row: 'none' is (N,) and
    /// 'mean' divides by N.
    pub flags: i32,
    /// The body's vector parameter (`aux`), one value per class, in any floating kind.
    pub class_param: Option<Tensor>,
    /// The class parameter's length where it is not one value per column (SeesawLoss's
    /// mitigation matrix and its log).
    pub class_param_len: Option<i64>,
    /// 'mean' without `avg_factor` divides by the count of valid elements (or rows), which the
    /// forward pass makes on the device (CrossEntropyLoss's `avg_non_ignore`).
    pub count_valid: bool,
    /// The histogram executor's settings, for histogram bodies.
    pub hist: Option<Hist>,
    /// MMDetection's zero-weight short-cut (L1, SmoothL1, the IoU family), decided on the device:
    /// where a weight is given and none is > 0, 'mean' and 'sum' give `sum(pred * weight)`,
    /// neither divided nor scaled, whose gradient is the weight.
    pub shortcut: bool,
    /// What valid targets are, for the error on the CPU (`None`: class indices in [0, C]).
    pub valid_targets: Option<&'static str>,
    pub loss_weight: f64,
    pub reduction: Reduction,
}

impl Spec {
    /// A body with its default slots: no parameters, flags, class parameter or histogram.
    pub fn new(
        body: Body,
        name: &'static str,
        shape: Shape,
        reduction: Reduction,
        loss_weight: f64,
    ) -> Self {
        Self {
            body,
            name,
            shape,
            params: [0.0; 4],
            int_param: 0,
            flags: 0,
            class_param: None,
            class_param_len: None,
            count_valid: false,
            hist: None,
            shortcut: false,
            valid_targets: None,
            loss_weight,
            reduction,
        }
    }

    /// One loss per row rather than per element.
    fn per_row(&self) -> bool {
        self.shape != Shape::Element || self.flags & FLAG_ROW_SUM != 0
    }
}

/// The histogram executor's settings (GHM).
#[derive(Debug)]
pub(crate) struct Hist {
    pub bins: i64,
    pub momentum: f64,
    /// The last bin edge (a float32 value).
    pub last_edge: f64,
    /// The momentum state: float32 `[bins]` on pred's device, updated in place by the forward pass.
    pub state: Option<Tensor>,
    /// The number of label weights as the loss was given them (before broadcasting), over which
    /// MMDetection's total runs.
    pub weight_numel: i64,
    /// The total (before its clamp at 1) as the loss computes it, a 0-dim float32 tensor on
    /// pred's device (GHM-R: the sum of the label weights); None: the count of the elements whose
    /// label weight is > 0.
    pub tot: Option<Tensor>,
}

/// The target as the kernels read it.
pub(crate) enum KTarget<'a> {
    /// (N, C), any real kind (converted to pred's).
    Dense(&'a Tensor),
    /// Class indices (N,).
    Labels(&'a Tensor),
    /// Class indices and the score of each anchor's class (N,), (N,).
    LabelsScores(&'a Tensor, &'a Tensor),
    /// One value per row (N,), any real kind (converted to pred's): DFL's distance.
    RowValue(&'a Tensor),
}

/// Tensors prepared for the kernels, kept by the autograd node for the backward pass (the
/// pointers in `args` point into them).
struct Prepared {
    spec: Spec,
    /// pred's (N, C); `args` may describe the same memory as longer rows (see `flatten_rows`).
    shape: (i64, i64),
    args: DlArgs,
    kind: Kind,
    device: Device,
    executor: Executor,
    /// pred, target, score, weight and avg_factor as the kernels read them; the autograd node
    /// checks their version counters before its backward reads them.
    saved: Vec<Tensor>,
    /// The executor's own buffers that the backward pass reads (class parameters, row
    /// statistics, bin weights, the divisor made on the device): held here, read by the kernels
    /// through the pointers in `args`.
    #[allow(dead_code)]
    buffers: Vec<Tensor>,
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
    // The call under its loss's name in a trace; its backward is the node `{name}Backward`.
    let _range = crate::profiler::range(name);
    let p = prepare(spec, pred, target, weight, avg_factor)?;
    let out_shape: Vec<i64> = match (p.spec.reduction, p.spec.per_row()) {
        (Reduction::None, false) => vec![p.shape.0, p.shape.1],
        (Reduction::None, true) => vec![p.shape.0],
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
        Some(Tensor::f_empty([p.shape.0, p.shape.1], (p.kind, p.device))?)
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
    mut spec: Spec,
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
    if spec.shape != Shape::Element {
        spec.flags |= FLAG_ROW_SUM;
    }
    if spec.shape == Shape::Box {
        ensure!(
            c == 4,
            "{name}: pred must be (N, 4) boxes (x1, y1, x2, y2), got shape {:?}",
            pred.size()
        );
    }
    let per_row = spec.per_row();
    let acc = acc_kind(kind);

    let executor = match device {
        Device::Cpu => crate::emu::current().map_or(Executor::Host, Executor::Emulated),
        Device::Cuda(ordinal) => Executor::Cuda(ordinal),
        d => bail!("{name}: pred is on {d:?}; only CPU and CUDA tensors are supported"),
    };
    let pred_c = pred.f_detach()?.f_contiguous()?;
    if spec.flags & FLAG_ACTIVATED != 0 && executor == Executor::Host {
        // On CUDA the kernels give NaN there instead (no host read).
        checks::probabilities(name, &pred_c)?;
    }
    let [p0, p1, p2, p3] = spec.params;
    let mut args = DlArgs {
        pred: ptr(&pred_c),
        n,
        c,
        loss_weight: spec.loss_weight,
        p0,
        p1,
        p2,
        p3,
        i0: spec.int_param,
        flags: spec.flags,
        reduction: reduction as i32,
        ..Default::default()
    };
    // Tensors the kernels read or write besides the inputs, kept alive with them.
    let mut buffers: Vec<Tensor> = Vec::new();

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
        KTarget::RowValue(t) => {
            checks::real(name, "target", t)?;
            same_device(name, "target", t, device)?;
            ensure!(
                t.dim() == 1 && t.size()[0] == n,
                "{name}: target must be ({n},) for pred of shape {:?}, got {:?}",
                pred.size(),
                t.size()
            );
            args.target_mode = TARGET_ROW_VALUE;
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
            // A box loss also takes one weight per coordinate, (N, 4), averaged over each box by
            // the kernels (MMDetection's `weight.mean(-1)`).
            let per_coordinate = spec.shape == Shape::Box && w.size() == [n, c];
            let shape: Vec<i64> = if per_row && !per_coordinate {
                vec![n, 1]
            } else {
                vec![n, c]
            };
            let w = w.f_detach()?.f_to_kind(kind)?;
            let e = w.f_expand(shape.as_slice(), false).map_err(|_| {
                anyhow::anyhow!(
                    "{name}: weight of shape {:?} does not broadcast against the loss of shape {:?}",
                    w.size(),
                    if per_row { vec![n] } else { vec![n, c] }
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

    if let Some(cp) = &spec.class_param {
        let t = cp
            .f_detach()?
            .f_to_device(device)?
            .f_to_kind(acc)?
            .f_contiguous()?;
        let len = spec.class_param_len.unwrap_or(c);
        ensure!(
            t.numel() as i64 == len,
            "{name}: the class parameter has {} values, not {len}",
            t.numel()
        );
        args.aux = ptr(&t);
        buffers.push(t);
    }
    if spec.shortcut && weight.is_some() && reduction != Reduction::None {
        // The forward pass's decision, for the backward pass.
        let t = Tensor::f_zeros([1], (acc, device))?;
        args.shortcut = ptr(&t);
        args.flags |= FLAG_SHORTCUT;
        buffers.push(t);
    }
    if spec.shape == Shape::Row {
        // Each row's log-sum-exp (a scan-row body's SCAN_STATS values), written by the forward
        // pass for the backward pass.
        let t = Tensor::f_zeros([SCAN_STATS * n.max(1)], (Kind::Double, device))?;
        args.row_stat = ptr(&t);
        buffers.push(t);
    }

    // A divisor that a pass makes on the device (the count of valid elements, the histogram's
    // total) for the passes after it.
    let avg_buffer = |args: &mut DlArgs, buffers: &mut Vec<Tensor>| -> Result<()> {
        let t = Tensor::f_zeros([1], (acc, device))?;
        args.avg_factor = ptr(&t);
        buffers.push(t);
        Ok(())
    };
    let avg_factor = match (reduction, avg_factor) {
        (Reduction::Mean, Some(AvgFactor::Value(v))) if spec.hist.is_none() => {
            args.has_avg_factor = AVG_VALUE;
            args.avg_factor_value = *v;
            None
        }
        (Reduction::Mean, Some(AvgFactor::Tensor(t))) if spec.hist.is_none() => {
            let t = t
                .f_detach()?
                .f_to_device(device)?
                .f_to_kind(acc)?
                .f_reshape([1])?
                .f_contiguous()?;
            args.has_avg_factor = AVG_TENSOR;
            args.avg_factor = ptr(&t);
            Some(t)
        }
        (Reduction::Mean, None) if spec.count_valid => {
            args.has_avg_factor = AVG_COUNT_VALID;
            avg_buffer(&mut args, &mut buffers)?;
            None
        }
        _ => None, // 'none' ignores avg_factor, as MMDetection does
    };

    if let Some(h) = &mut spec.hist {
        ensure!(
            (1..=MAX_BINS).contains(&h.bins),
            "{name}: bins must be in [1, {MAX_BINS}], got {}",
            h.bins
        );
        // The total, the divisor of 'mean', is written by the histogram finalize.
        avg_buffer(&mut args, &mut buffers)?;
        args.has_avg_factor = AVG_TENSOR;
        // Each bin's weight, then the bins + 1 edges (kernels/kernels.cu, hist_finalize).
        let w = Tensor::f_zeros([2 * h.bins + 1], (acc, device))?;
        args.hist_weights = ptr(&w);
        buffers.push(w);
        args.bins = h.bins as i32;
        args.momentum = h.momentum;
        args.last_edge = h.last_edge;
        // MMDetection's total counts (or sums) the label weights as given: each stands for
        // this many elements once broadcast against the loss.
        args.hist_replicas = match weight.as_ref() {
            Some(_) if h.weight_numel > 0 && n * c > 0 => (n * c) as f64 / h.weight_numel as f64,
            _ => 1.0,
        };
        if let Some(st) = &h.state {
            ensure!(
                st.kind() == Kind::Float
                    && st.device() == device
                    && st.is_contiguous()
                    && st.size() == [h.bins],
                "{name}: the momentum state must be float32 ({},) on pred's device",
                h.bins
            );
            args.hist_state = ptr(st);
        }
        if let Some(tot) = &h.tot {
            ensure!(
                tot.kind() == Kind::Float && tot.device() == device && tot.numel() == 1,
                "{name}: the histogram's total must be one float32 value on pred's device"
            );
            let tot = tot.f_contiguous()?;
            args.hist_tot = ptr(&tot);
            buffers.push(tot);
        }
    }

    flatten_rows(&spec, &mut args);
    let saved = [Some(pred_c), Some(target_t), score, weight, avg_factor]
        .into_iter()
        .flatten()
        .collect();
    Ok(Prepared {
        spec,
        shape: (n, c),
        args,
        kind,
        device,
        executor,
        saved,
        buffers,
    })
}

/// Short rows of an element-wise loss read as longer ones: where nothing depends on the column
/// (dense targets, no per-class parameter, a weight per element laid out as pred or none), the
/// contiguous (N, C) arrays are the same memory as (N / r, C r). The CPU executor's cost per row
/// then spreads over r rows (box deltas: C = 4). Results are unchanged.
fn flatten_rows(spec: &Spec, args: &mut DlArgs) {
    const TARGET_ROW: i64 = 256;
    let (n, c) = (args.n, args.c);
    let elementwise = spec.shape == Shape::Element
        && !spec.per_row()
        && args.target_mode == TARGET_DENSE
        && args.aux == 0
        && (args.weight == 0 || (args.w_sn == c && args.w_sc == 1));
    if !elementwise || n <= 1 || c <= 0 || c >= TARGET_ROW {
        return;
    }
    // The largest r <= TARGET_ROW / C that divides N.
    let r = (1..=TARGET_ROW / c).rev().find(|r| n % r == 0).unwrap_or(1);
    if r > 1 {
        args.n = n / r;
        args.c = c * r;
        if args.weight != 0 {
            args.w_sn = args.c;
        }
    }
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
        let up = if p.spec.per_row() {
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
    let out = Tensor::f_empty([p.shape.0, p.shape.1], (p.kind, p.device))?;
    // `args` points into the saved tensors, which the node keeps alive.
    let mut args = p.args;
    args.grad_out = ptr(&grad);
    args.out = ptr(&out);
    (args.g_sn, args.g_sc) = match (p.spec.reduction, p.spec.per_row()) {
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
                match p.spec.valid_targets {
                    Some(valid) => bail!("{name}: {bad} target(s) out of range (valid: {valid})"),
                    None => bail!(
                        "{name}: {bad} class-index target(s) outside [0, {c}] (0..{c} are classes, {c} is background)",
                        c = args.c
                    ),
                }
            }
            return Ok(());
        }
        Executor::Cuda(_) => crate::launch::Geometry::default(),
        Executor::Emulated(e) => e.geometry(),
    };
    let plan = crate::launch::plan(p.spec.body, p.spec.shape, pass, p.kind, args, geometry);
    let opts = (acc_kind(p.kind), p.device);
    // The per-block partials of a reduction (and of the histogram pre-pass): the loss sums, then
    // the valid counts where the divisor is their count. On CUDA the buffer goes back to the
    // caching allocator when dropped, which orders its reuse on torch's current stream, the one
    // we launch on; the emulated device runs synchronously.
    let _partials = if plan.finalize.is_some() || plan.histogram.is_some() {
        let n = i64::from(plan.blocks);
        let len = n * if args.flags & FLAG_SHORTCUT != 0 {
            SLOTS_WITH_SHORTCUT
        } else if args.has_avg_factor == AVG_COUNT_VALID {
            SLOTS_WITH_COUNT
        } else {
            1
        };
        let t = match p.executor {
            // On the emulated device NaNs follow the partials, so that a kernel that reads
            // past them gives a NaN loss rather than a plausible one.
            Executor::Emulated(_) => Tensor::f_full([len + EMULATED_CANARY], f64::NAN, opts)?,
            _ => Tensor::f_empty([len], opts)?,
        };
        args.partials = ptr(&t);
        args.n_partials = plan.blocks as i32;
        Some(t)
    } else {
        None
    };
    let _counts = match &plan.histogram {
        Some(_) => {
            let t = Tensor::f_empty(
                [i64::from(plan.blocks) * (i64::from(args.bins) + 1)],
                (Kind::Int, p.device),
            )?;
            args.hist_counts = ptr(&t);
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
    if let Some((histogram, finalize)) = &plan.histogram {
        run(histogram, plan.blocks, args).with_context(|| context("device histogram"))?;
        run(finalize, 1, args).with_context(|| context("device histogram finalize"))?;
    }
    if plan.finalize.is_some() || args.n * args.c > 0 {
        run(&plan.kernel, plan.blocks, args).with_context(|| context("device"))?;
    }
    if let Some((finalize, _)) = &plan.finalize {
        run(finalize, 1, args).with_context(|| context("device finalize"))?;
    }
    Ok(())
}
