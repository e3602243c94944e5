//! `cargo bench --bench profile [-- OPTIONS]` (or `make profile`): the fused losses against
//! their stock-op compositions, side by side, in one process, on every device present.
//!
//! # What it measures
//!
//! For `FocalLoss`, `QualityFocalLoss` and `VarifocalLoss` (MMDetection's defaults), on the CPU
//! and on each CUDA device, at the shapes of real detection heads (DESIGN.md §7), it times three
//! passes of [`Loss::forward`] (fused) and of [`Loss::forward_unfused`] (stock tch ops, the
//! baseline a user writes today):
//!
//! - `forward`: the loss call, with `pred.requires_grad` set as in training. An implementation
//!   may do backward work here: the unfused variant saves its intermediates, and the fused CPU
//!   kernels write the gradient during this pass (the backward only scales it).
//! - `backward`: each repetition runs the forward pass outside the clock, then times
//!   `Tensor::run_backward(&[&loss], &[&pred], ..)` on that fresh graph: exactly the work of
//!   `loss.backward()` in a training step (autograd engine included). The gradient is returned,
//!   not accumulated into `pred.grad()`.
//! - `forward+backward`: both under one clock: the loss's share of a training step, and the
//!   figure that compares whole steps whatever work an implementation moves between passes.
//!
//! Each figure is the median of `reps` repetitions after `warmup` untimed ones (the JSON also
//! keeps the fastest); the fused and unfused repetitions alternate (`f u u f f u ...`), so a
//! background load that comes and goes slows both alike. On CUDA the device is synchronized
//! before the clock starts and before it stops, so what is timed is the work on the device,
//! never the asynchronous launch. `avg_factor` is a 0-dim tensor on the loss's device (the
//! number of positives, as RetinaNet computes it), so the fused variant reads nothing back to
//! the host (the unfused QualityFocalLoss does, in `nonzero`, as MMDetection's code does).
//!
//! Inputs mimic a RetinaNet/GFL/VFNet head: logits around the head's prior bias (about -4), 1 %
//! positive anchors with a random class, 5 % ignored anchors (label weight 0), IoU-like scores
//! in (0.1, 1] for the positives.
//!
//! # What it reports
//!
//! One row per (loss, device, dtype, pass): median fused and unfused milliseconds, the speedup
//! (unfused / fused) and the largest absolute difference between the two results (the loss
//! values for `forward`; the gradients w.r.t. `pred` for `backward` and `forward+backward`,
//! which compute the same gradient). On CUDA also:
//! - `fused_gbps`: the bytes the fused pass has to move at the least (forward reads `pred`, the
//!   labels or target, the scores and the weights once; backward reads the same and writes the
//!   gradient; `forward+backward` is the sum), divided by the median time;
//! - `copy_gbps`: the bandwidth a device-to-device `copy_` of a 1 GiB tensor achieves on this
//!   card (read + write bytes over time), the practical ceiling for a memory-bound kernel, and
//!   `fused_pct_of_copy` = `fused_gbps / copy_gbps`;
//! - `fused_peak_bytes` / `unfused_peak_bytes`: the peak of libtorch's CUDA caching allocator
//!   during one forward+backward of each variant, above what was allocated before it (the
//!   inputs), read through `tch_detloss::cuda::allocated_bytes`. `null` on the CPU, where there
//!   is no per-variant measure (the process's high-water RSS never goes down).
//!
//! The table goes to stdout; the same rows go, as a JSON array, to `target/profile/report.json`
//! under the crate root (or `--json PATH`).
//!
//! # Options
//!
//! ```text
//! --quick          small shapes and few repetitions (a smoke test)
//! --device D       cpu, cuda (every CUDA device) or cuda:K; default: all present
//! --n N            anchors (rows); default 40000 on the CPU (2 images x 20k), 1600000 on CUDA
//!                  (16 images x 100k)
//! --c C            classes; default 80
//! --reps R         timed repetitions; default 25 on the CPU, 50 on CUDA
//! --warmup W       untimed repetitions first; default 3 on the CPU, 10 on CUDA
//! --threads T      torch's intra-op threads, used by both variants on the CPU (default: torch's
//!                  choice, one per core)
//! --json PATH      where to write the JSON rows
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};
use tch_detloss::losses::{FocalLoss, QualityFocalLoss, VarifocalLoss};
use tch_detloss::{Loss, LossArgs, Target};

const USAGE: &str = "\
usage: cargo bench --bench profile [-- OPTIONS]

Times the fused losses against their stock-op compositions (forward, backward, both) on every
device present, prints a table and writes the rows as JSON.

options:
  --quick          small shapes and few repetitions (a smoke test)
  --device D       cpu, cuda (every CUDA device) or cuda:K; default: all present
  --n N            anchors (rows); default 40000 on the CPU, 1600000 on CUDA
  --c C            classes; default 80
  --reps R         timed repetitions; default 25 on the CPU, 50 on CUDA
  --warmup W       untimed repetitions before them; default 3 on the CPU, 10 on CUDA
  --threads T      torch's intra-op threads on the CPU (default: torch's choice)
  --json PATH      where to write the JSON rows (default: target/profile/report.json)
  -h, --help       this text";

/// 2 images x 20,000 anchors: what a 2-core CPU handles in a few milliseconds per pass.
const CPU_N: i64 = 40_000;
/// 16 images x 100,000 anchors: a RetinaNet batch on one GPU.
const CUDA_N: i64 = 1_600_000;
const DEFAULT_C: i64 = 80;
const QUICK_CPU_N: i64 = 4_000;
const QUICK_CUDA_N: i64 = 100_000;
/// Size of the tensor whose device-to-device copy gives the reference bandwidth.
const COPY_BYTES: i64 = 1 << 30;

/// Fraction of anchors that are positive, and of anchors that are ignored (weight 0).
const POSITIVE_FRACTION: f64 = 0.01;
const IGNORED_FRACTION: f64 = 0.05;

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceChoice {
    /// The CPU and every CUDA device (CUDA silently skipped when there is none).
    All,
    Cpu,
    /// Every CUDA device, or one.
    Cuda(Option<usize>),
}

#[derive(Debug)]
struct Options {
    quick: bool,
    device: DeviceChoice,
    n: Option<i64>,
    c: i64,
    reps: Option<usize>,
    warmup: Option<usize>,
    threads: Option<i32>,
    json: PathBuf,
}

impl Options {
    /// Parses the arguments after `--`; `None` for `--help`.
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Self>> {
        let mut o = Options {
            quick: false,
            device: DeviceChoice::All,
            n: None,
            c: DEFAULT_C,
            reps: None,
            warmup: None,
            threads: None,
            json: PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/target/profile/report.json"
            )),
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            // Both `--key value` and `--key=value`.
            let (key, inline) = match arg.split_once('=') {
                Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| -> Result<String> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => args
                        .next()
                        .with_context(|| format!("{name} needs a value\n\n{USAGE}")),
                }
            };
            match key.as_str() {
                // cargo passes `--bench` to every bench binary.
                "--bench" => {}
                "-h" | "--help" => return Ok(None),
                "--quick" => o.quick = true,
                "--device" => o.device = parse_device(&value("--device")?)?,
                "--n" => o.n = Some(parse_positive(&key, &value(&key)?)?),
                "--c" => o.c = parse_positive(&key, &value(&key)?)?,
                "--reps" => o.reps = Some(parse_positive(&key, &value(&key)?)? as usize),
                "--warmup" => {
                    let v = value(&key)?;
                    o.warmup = Some(
                        v.parse()
                            .with_context(|| format!("--warmup: {v:?} is not a count"))?,
                    );
                }
                "--threads" => {
                    let t = parse_positive(&key, &value(&key)?)?;
                    o.threads = Some(i32::try_from(t).context("--threads: too large")?);
                }
                "--json" => o.json = PathBuf::from(value(&key)?),
                _ => bail!("unknown argument {arg:?}\n\n{USAGE}"),
            }
        }
        Ok(Some(o))
    }
}

fn parse_device(s: &str) -> Result<DeviceChoice> {
    Ok(match s {
        "cpu" => DeviceChoice::Cpu,
        "cuda" => DeviceChoice::Cuda(None),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(k)) => DeviceChoice::Cuda(Some(k)),
            _ => bail!("--device: expected cpu, cuda or cuda:K, got {s:?}"),
        },
    })
}

fn parse_positive(name: &str, s: &str) -> Result<i64> {
    let v: i64 = s
        .parse()
        .with_context(|| format!("{name}: {s:?} is not an integer"))?;
    ensure!(v > 0, "{name} must be positive, got {v}");
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// What runs where
// ---------------------------------------------------------------------------------------------

/// The losses under test, with MMDetection's default configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Focal,
    QualityFocal,
    Varifocal,
}

impl Which {
    fn build(self) -> Box<dyn Loss> {
        match self {
            Which::Focal => Box::new(FocalLoss::default()),
            Which::QualityFocal => Box::new(QualityFocalLoss::default()),
            Which::Varifocal => Box::new(VarifocalLoss::default()),
        }
    }
}

/// The three timed passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward,
    Backward,
    Both,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::Backward => "backward",
            Pass::Both => "forward+backward",
        }
    }
}

/// One device's share of the run: its shape, repetition counts and (loss, dtype) cases.
struct Plan {
    device: Device,
    n: i64,
    c: i64,
    warmup: usize,
    reps: usize,
    cases: Vec<(Which, Kind)>,
    /// Reference bandwidth of this device (CUDA only), in GB/s.
    copy_gbps: Option<f64>,
}

fn plans(o: &Options) -> Result<Vec<Plan>> {
    let cuda_count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
    let cuda: Vec<usize> = match o.device {
        DeviceChoice::Cpu => vec![],
        DeviceChoice::All => (0..cuda_count).collect(),
        DeviceChoice::Cuda(None) => {
            ensure!(
                cuda_count > 0,
                "--device cuda: no CUDA device found (tch::Cuda::device_count() is 0)"
            );
            (0..cuda_count).collect()
        }
        DeviceChoice::Cuda(Some(k)) => {
            ensure!(
                k < cuda_count,
                "--device cuda:{k}: this machine has {cuda_count} CUDA device(s)"
            );
            vec![k]
        }
    };
    if !cuda.is_empty() && !tch_detloss::cuda::kernels_built() {
        ensure!(
            o.device == DeviceChoice::All,
            "this build of tch-detloss has no CUDA kernels (nvcc was not found at build time); \
             run scripts/setup.sh and rebuild"
        );
        eprintln!(
            "note: skipping {} CUDA device(s): this build has no CUDA kernels (nvcc was not \
             found at build time; run scripts/setup.sh and rebuild)",
            cuda.len()
        );
    }

    let mut out = Vec::new();
    if matches!(o.device, DeviceChoice::All | DeviceChoice::Cpu) {
        out.push(Plan {
            device: Device::Cpu,
            n: o.n.unwrap_or(if o.quick { QUICK_CPU_N } else { CPU_N }),
            c: o.c,
            warmup: o.warmup.unwrap_or(if o.quick { 1 } else { 3 }),
            reps: o.reps.unwrap_or(if o.quick { 3 } else { 25 }),
            cases: vec![
                (Which::Focal, Kind::Float),
                (Which::QualityFocal, Kind::Float),
                (Which::Varifocal, Kind::Float),
            ],
            copy_gbps: None,
        });
    }
    if tch_detloss::cuda::kernels_built() {
        for k in cuda {
            out.push(Plan {
                device: Device::Cuda(k),
                n: o.n.unwrap_or(if o.quick { QUICK_CUDA_N } else { CUDA_N }),
                c: o.c,
                warmup: o.warmup.unwrap_or(if o.quick { 2 } else { 10 }),
                reps: o.reps.unwrap_or(if o.quick { 5 } else { 50 }),
                cases: vec![
                    (Which::Focal, Kind::Float),
                    (Which::Focal, Kind::BFloat16),
                    (Which::Focal, Kind::Half),
                    (Which::QualityFocal, Kind::Float),
                    (Which::Varifocal, Kind::Float),
                ],
                copy_gbps: None,
            });
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/// The inputs of one loss call, as a detection head produces them.
struct Inputs {
    which: Which,
    n: i64,
    c: i64,
    kind: Kind,
    /// Logits (N, C), a leaf that requires grad.
    pred: Tensor,
    target: TargetData,
    /// Label weights, float32 (N,) (FocalLoss, QFL; VFNet passes none).
    weight: Tensor,
    /// The number of positives (at least 1), a 0-dim float32 tensor on the device.
    avg_factor: Tensor,
}

/// The target each loss gets from its head.
enum TargetData {
    /// FocalLoss: the class of each anchor, int64 (N,), `C` = background.
    Labels(Tensor),
    /// QualityFocalLoss: the labels and the IoU quality of each positive (0 for negatives).
    LabelsScores(Tensor, Tensor),
    /// VarifocalLoss: the dense IoU-aware target (N, C): the IoU at each positive's class.
    Dense(Tensor),
}

impl Inputs {
    fn new(which: Which, n: i64, c: i64, kind: Kind, device: Device) -> Result<Self> {
        let f32s = (Kind::Float, device);
        let pred = Tensor::f_randn([n, c], f32s)?
            .f_mul_scalar(1.5)?
            .f_sub_scalar(4.0)?
            .f_to_kind(kind)?
            .set_requires_grad(true);
        let positive = Tensor::f_rand([n], f32s)?.f_lt(POSITIVE_FRACTION)?;
        let labels =
            Tensor::f_randint(c, [n], (Kind::Int64, device))?.f_where_scalarother(&positive, c)?;
        let scores = Tensor::f_rand([n], f32s)?
            .f_mul_scalar(0.9)?
            .f_add_scalar(0.1)?
            .f_where_scalarother(&positive, 0.0)?
            .f_to_kind(kind)?;
        let target = match which {
            Which::Focal => TargetData::Labels(labels),
            Which::QualityFocal => TargetData::LabelsScores(labels, scores),
            Which::Varifocal => TargetData::Dense(
                labels
                    .f_one_hot(c + 1)?
                    .f_narrow(1, 0, c)?
                    .f_to_kind(kind)?
                    .f_mul(&scores.f_unsqueeze(1)?)?,
            ),
        };
        let weight = Tensor::f_rand([n], f32s)?
            .f_ge(IGNORED_FRACTION)?
            .f_to_kind(Kind::Float)?;
        let avg_factor = positive.f_sum(Kind::Float)?.f_clamp_min(1.0)?;
        Ok(Self {
            which,
            n,
            c,
            kind,
            pred,
            target,
            weight,
            avg_factor,
        })
    }

    fn target(&self) -> Target<'_> {
        match &self.target {
            TargetData::Labels(labels) => Target::Tensor(labels),
            TargetData::LabelsScores(labels, scores) => Target::LabelsScores { labels, scores },
            TargetData::Dense(t) => Target::Tensor(t),
        }
    }

    fn args(&self) -> LossArgs<'_> {
        let args = LossArgs::new().avg_factor(&self.avg_factor);
        match self.which {
            Which::Focal | Which::QualityFocal => args.weight(&self.weight),
            Which::Varifocal => args,
        }
    }

    /// The fewest bytes the fused pass can move: every input read once (at the element sizes
    /// the kernels read), and for backward the gradient written once.
    fn fused_bytes(&self, pass: Pass) -> u64 {
        let e = self.kind.elt_size_in_bytes() as u64;
        let (n, nc) = (self.n as u64, (self.n * self.c) as u64);
        let side = match self.target {
            TargetData::Labels(_) => n * 8 + n * e, // labels, weights
            TargetData::LabelsScores(..) => n * 8 + 2 * n * e, // labels, scores, weights
            TargetData::Dense(_) => nc * e,         // dense target, no weights
        };
        let forward = nc * e + side;
        let backward = nc * e + side + nc * e;
        match pass {
            Pass::Forward => forward,
            Pass::Backward => backward,
            Pass::Both => forward + backward,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Timing
// ---------------------------------------------------------------------------------------------

/// Times closures on one device: wall clock, with a device synchronization on both ends on CUDA.
struct Clock {
    cuda: Option<i64>,
    warmup: usize,
    reps: usize,
}

/// The timed region of one call: the closure under test starts and stops it, so that it can
/// prepare its inputs (run the forward pass before timing the backward) outside the clock.
struct Stopwatch {
    cuda: Option<i64>,
    started: Option<Instant>,
    ms: Option<f64>,
}

impl Stopwatch {
    fn sync(&self) {
        if let Some(k) = self.cuda {
            tch::Cuda::synchronize(k);
        }
    }

    /// Waits for the device to finish the work queued so far, then starts the clock.
    fn start(&mut self) {
        self.sync();
        self.started = Some(Instant::now());
    }

    /// Waits for the device to finish the timed work, then stops the clock.
    fn stop(&mut self) {
        self.sync();
        if let Some(t) = self.started {
            self.ms = Some(t.elapsed().as_secs_f64() * 1e3);
        }
    }
}

impl Clock {
    /// Milliseconds of one call's timed region; what the call returns is dropped afterwards.
    fn once<T>(&self, f: &mut impl FnMut(&mut Stopwatch) -> Result<T>) -> Result<f64> {
        let mut sw = Stopwatch {
            cuda: self.cuda,
            started: None,
            ms: None,
        };
        drop(f(&mut sw)?);
        sw.ms
            .context("internal error: a timed closure did not start and stop its stopwatch")
    }

    /// Times two closures interleaved, `a b b a a b ...`, after `warmup` untimed calls of each,
    /// so that both see the same machine: a background load that comes and goes (a 2-core
    /// laptop, a shared CI runner) then slows both alike instead of whichever ran during it.
    fn time_pair<A, B>(
        &self,
        mut a: impl FnMut(&mut Stopwatch) -> Result<A>,
        mut b: impl FnMut(&mut Stopwatch) -> Result<B>,
    ) -> Result<(Timing, Timing)> {
        for _ in 0..self.warmup {
            self.once(&mut a)?;
            self.once(&mut b)?;
        }
        let (mut ms_a, mut ms_b) = (Vec::with_capacity(self.reps), Vec::with_capacity(self.reps));
        for i in 0..self.reps {
            if i % 2 == 0 {
                ms_a.push(self.once(&mut a)?);
                ms_b.push(self.once(&mut b)?);
            } else {
                ms_b.push(self.once(&mut b)?);
                ms_a.push(self.once(&mut a)?);
            }
        }
        Ok((Timing::of(&mut ms_a), Timing::of(&mut ms_b)))
    }

    /// Times one closure the same way.
    fn time<T>(&self, mut f: impl FnMut(&mut Stopwatch) -> Result<T>) -> Result<Timing> {
        for _ in 0..self.warmup {
            self.once(&mut f)?;
        }
        let mut ms = (0..self.reps)
            .map(|_| self.once(&mut f))
            .collect::<Result<Vec<_>>>()?;
        Ok(Timing::of(&mut ms))
    }
}

/// Runs `forward` outside the clock, then times `backward` of its result.
fn backward_of<T>(
    forward: impl Fn() -> Result<Tensor>,
    backward: impl Fn(&Tensor) -> Result<T>,
) -> impl FnMut(&mut Stopwatch) -> Result<T> {
    move |sw| {
        let loss = forward()?;
        sw.start();
        let out = backward(&loss);
        sw.stop();
        out
    }
}

/// Times `f` as a whole.
fn whole<T>(mut f: impl FnMut() -> Result<T>) -> impl FnMut(&mut Stopwatch) -> Result<T> {
    move |sw| {
        sw.start();
        let out = f();
        sw.stop();
        out
    }
}

/// Milliseconds of one timed closure.
#[derive(Clone, Copy, Debug)]
struct Timing {
    median_ms: f64,
    /// The fastest repetition: far below the median means a noisy machine.
    min_ms: f64,
}

impl Timing {
    fn of(ms: &mut [f64]) -> Self {
        let median_ms = median(ms); // sorts
        Self {
            median_ms,
            min_ms: ms.first().copied().unwrap_or(f64::NAN),
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// The achieved bandwidth (read + write bytes per second, in GB/s) of a device-to-device copy
/// of a 1 GiB float32 tensor: the reference for a memory-bound kernel on this card.
fn copy_gbps(ordinal: usize) -> Result<f64> {
    let device = Device::Cuda(ordinal);
    let numel = COPY_BYTES / 4;
    let src = Tensor::f_rand([numel], (Kind::Float, device))?;
    let mut dst = Tensor::f_empty([numel], (Kind::Float, device))?;
    let clock = Clock {
        cuda: Some(ordinal as i64),
        warmup: 3,
        reps: 20,
    };
    let t = clock.time(whole(|| Ok(dst.f_copy_(&src)?)))?;
    Ok(2.0 * COPY_BYTES as f64 / (t.median_ms * 1e-3) / 1e9)
}

// ---------------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------------

/// One line of the table and one object of the JSON report.
#[derive(Debug, Serialize)]
struct Row {
    loss: String,
    device: String,
    dtype: &'static str,
    shape: String,
    n: i64,
    c: i64,
    pass: &'static str,
    /// Medians.
    fused_ms: f64,
    unfused_ms: f64,
    /// The fastest repetitions.
    fused_min_ms: f64,
    unfused_min_ms: f64,
    /// unfused_ms / fused_ms.
    speedup: f64,
    /// Largest |fused - unfused| over the loss (forward) or the gradient (backward rows).
    max_abs_diff: f64,
    /// Largest |unfused| over the same values: the scale `max_abs_diff` compares against.
    unfused_max_abs: f64,
    warmup: usize,
    reps: usize,
    /// Least bytes the fused pass moves (CUDA rows only).
    fused_bytes: Option<u64>,
    fused_gbps: Option<f64>,
    copy_gbps: Option<f64>,
    fused_pct_of_copy: Option<f64>,
    /// Not measurable through tch yet (see the module documentation): always null.
    fused_peak_bytes: Option<u64>,
    unfused_peak_bytes: Option<u64>,
    crate_version: &'static str,
    cpu_isa: &'static str,
    torch_threads: i32,
}

fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::Double => "float64",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        _ => "other",
    }
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(k) => format!("cuda:{k}"),
        _ => "cpu".to_string(),
    }
}

/// (max |a - b|, max |b|), computed in float64.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    ensure!(
        a.size() == b.size(),
        "fused and unfused results differ in shape: {:?} vs {:?}",
        a.size(),
        b.size()
    );
    if a.numel() == 0 {
        return Ok((0.0, 0.0));
    }
    let (a, b) = (a.f_to_kind(Kind::Double)?, b.f_to_kind(Kind::Double)?);
    let diff = a.f_sub(&b)?.f_abs()?.f_max()?.f_double_value(&[])?;
    let scale = b.f_abs()?.f_max()?.f_double_value(&[])?;
    Ok((diff, scale))
}

/// Runs the three passes of one (loss, dtype) case on one device.
fn profile_case(plan: &Plan, which: Which, kind: Kind) -> Result<Vec<Row>> {
    let loss = which.build();
    let x = Inputs::new(which, plan.n, plan.c, kind, plan.device)?;
    let clock = Clock {
        cuda: match plan.device {
            Device::Cuda(k) => Some(k as i64),
            _ => None,
        },
        warmup: plan.warmup,
        reps: plan.reps,
    };
    let args = x.args();
    let fused = || loss.forward(&x.pred, x.target(), &args);
    let unfused = || loss.forward_unfused(&x.pred, x.target(), &args);
    // The gradient w.r.t. pred, returned rather than accumulated into pred.grad(); the graph is
    // freed, as `loss.backward()` frees it.
    let grad = |l: &Tensor| -> Result<Tensor> {
        let mut g = Tensor::f_run_backward(&[l], &[&x.pred], false, false)?;
        g.pop().context("run_backward returned no gradient")
    };

    // One untimed forward and backward of each: the values compared.
    let (l_fused, l_unfused) = (fused()?, unfused()?);
    let forward_diff = max_abs_diff(&l_fused, &l_unfused)?;
    let (g_fused, g_unfused) = (grad(&l_fused)?, grad(&l_unfused)?);
    let grad_diff = max_abs_diff(&g_fused, &g_unfused)?;
    drop((l_fused, l_unfused, g_fused, g_unfused));

    // Peak memory of one forward+backward of each, above what was allocated before it (the
    // inputs): from libtorch's caching allocator, on CUDA only.
    let peak = |step: &dyn Fn() -> Result<Tensor>| -> Result<Option<u64>> {
        let Some(k) = clock.cuda else { return Ok(None) };
        let ordinal = k as usize;
        tch::Cuda::synchronize(k);
        let Some((before, _)) = tch_detloss::cuda::allocated_bytes(ordinal) else {
            return Ok(None);
        };
        if !tch_detloss::cuda::reset_peak_allocated(ordinal) {
            return Ok(None);
        }
        drop(step()?);
        tch::Cuda::synchronize(k);
        Ok(tch_detloss::cuda::allocated_bytes(ordinal).map(|(_, p)| p.saturating_sub(before)))
    };
    let fused_peak = peak(&|| grad(&fused()?))?;
    let unfused_peak = peak(&|| grad(&unfused()?))?;

    let mut timed = Vec::with_capacity(3);
    let (f, u) = clock.time_pair(whole(fused), whole(unfused))?;
    timed.push((Pass::Forward, f, u, forward_diff));
    let (f, u) = clock.time_pair(backward_of(fused, grad), backward_of(unfused, grad))?;
    timed.push((Pass::Backward, f, u, grad_diff));
    let (f, u) = clock.time_pair(whole(|| grad(&fused()?)), whole(|| grad(&unfused()?)))?;
    timed.push((Pass::Both, f, u, grad_diff));

    let on_cuda = clock.cuda.is_some();
    Ok(timed
        .into_iter()
        .map(|(pass, fused, unfused, (diff, scale))| {
            let bytes = on_cuda.then(|| x.fused_bytes(pass));
            let gbps = bytes.map(|b| b as f64 / (fused.median_ms * 1e-3) / 1e9);
            Row {
                loss: loss.type_name().to_string(),
                device: device_name(plan.device),
                dtype: dtype_name(kind),
                shape: format!("[{}, {}]", plan.n, plan.c),
                n: plan.n,
                c: plan.c,
                pass: pass.name(),
                fused_ms: fused.median_ms,
                unfused_ms: unfused.median_ms,
                fused_min_ms: fused.min_ms,
                unfused_min_ms: unfused.min_ms,
                speedup: unfused.median_ms / fused.median_ms,
                max_abs_diff: diff,
                unfused_max_abs: scale,
                warmup: plan.warmup,
                reps: plan.reps,
                fused_bytes: bytes,
                fused_gbps: gbps,
                copy_gbps: plan.copy_gbps,
                fused_pct_of_copy: gbps.zip(plan.copy_gbps).map(|(g, c)| 100.0 * g / c),
                fused_peak_bytes: fused_peak,
                unfused_peak_bytes: unfused_peak,
                crate_version: env!("CARGO_PKG_VERSION"),
                cpu_isa: tch_detloss::cpu_isa(),
                torch_threads: tch::get_num_threads(),
            }
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

fn table_header() -> String {
    let h = format!(
        "{:<16} {:<7} {:<8} {:<14} {:<16} {:>10} {:>10} {:>8} {:>9} {:>7} {:>6}",
        "loss",
        "device",
        "dtype",
        "shape",
        "pass",
        "fused ms",
        "unfused ms",
        "speedup",
        "max|diff|",
        "GB/s",
        "%copy"
    );
    let rule = "-".repeat(h.len());
    format!("{h}\n{rule}")
}

fn table_line(r: &Row) -> String {
    let opt = |v: Option<f64>, digits: usize| {
        v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
    };
    format!(
        "{:<16} {:<7} {:<8} {:<14} {:<16} {:>10.3} {:>10.3} {:>7.2}x {:>9.1e} {:>7} {:>6}",
        r.loss,
        r.device,
        r.dtype,
        r.shape,
        r.pass,
        r.fused_ms,
        r.unfused_ms,
        r.speedup,
        r.max_abs_diff,
        opt(r.fused_gbps, 0),
        opt(r.fused_pct_of_copy, 0),
    )
}

fn write_json(path: &PathBuf, rows: &[Row]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(rows)?;
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
}

fn main() -> Result<()> {
    let Some(opts) = Options::parse(std::env::args().skip(1))? else {
        println!("{USAGE}");
        return Ok(());
    };
    let started = Instant::now();
    if let Some(t) = opts.threads {
        tch::set_num_threads(t);
    }
    tch::manual_seed(0);
    let mut plans = plans(&opts)?;

    println!(
        "tch-detloss {} profile: fused kernels against stock tch ops (unfused)",
        env!("CARGO_PKG_VERSION")
    );
    println!(
        "cpu executor: {} | torch threads: {} | CUDA kernels built: {} | CUDA devices: {}",
        tch_detloss::cpu_isa(),
        tch::get_num_threads(),
        if tch_detloss::cuda::kernels_built() {
            "yes"
        } else {
            "no"
        },
        tch::Cuda::device_count()
    );
    for plan in &mut plans {
        let Device::Cuda(k) = plan.device else {
            continue;
        };
        let gbps = copy_gbps(k).with_context(|| format!("measuring copy bandwidth on cuda:{k}"))?;
        println!("cuda:{k}: device-to-device copy of 1 GiB: {gbps:.0} GB/s (read + write), the %copy reference");
        plan.copy_gbps = Some(gbps);
    }
    for plan in &plans {
        println!(
            "{}: [{}, {}], median of {} reps after {} warm-up",
            device_name(plan.device),
            plan.n,
            plan.c,
            plan.reps,
            plan.warmup
        );
    }
    println!();
    println!("{}", table_header());

    let mut rows = Vec::new();
    for plan in &plans {
        for &(which, kind) in &plan.cases {
            let case = profile_case(plan, which, kind).with_context(|| {
                format!(
                    "profiling {which:?} on {} in {}",
                    device_name(plan.device),
                    dtype_name(kind)
                )
            })?;
            for row in case {
                println!("{}", table_line(&row));
                rows.push(row);
            }
        }
    }

    if let Some(h) = rows
        .iter()
        .find(|r| r.device == "cpu" && r.loss == "FocalLoss" && r.pass == Pass::Both.name())
    {
        println!(
            "\nheadline: FocalLoss forward+backward on the CPU at {}: {:.2}x faster fused (goal: 3x)",
            h.shape, h.speedup
        );
    }
    write_json(&opts.json, &rows)?;
    println!(
        "\n{} rows written to {}; wall time {:.1} s",
        rows.len(),
        opts.json.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
