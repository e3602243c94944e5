//! Trains a detector on procedurally generated shapes with MMDetection's loss pipeline from
//! tch-detloss: one of five dense heads (`--head atss|gfl|fcos|rtmdet|tood`, see `heads`), each
//! with its own branches, initialisation and decoding, its targets batched on the device, and its
//! losses built from MMDetection config dicts, fused by default.
//!
//! ```sh
//! make train                                    # ATSS, the default run (CPU), 3 to 4 minutes on 2 cores
//! make train HEAD=rtmdet                        # another head
//! cargo run --release --example train -- --help
//! ```
//!
//! Data-parallel, under torchrun from the set-up's Python environment (`make train-dist`):
//!
//! ```sh
//! .venv/bin/torchrun --standalone --nproc-per-node 2 --no-python target/release/examples/train
//! ```
//!
//! Each rank then takes its share of every batch (the same images in the same order on every
//! rank, rank r its r-th slice), the `avg_factor`s go through `reduce_mean` and the gradients
//! through `DistributedDataParallel`, as MMDetection trains; Gloo on the CPU, NCCL with
//! `--device cuda` (one GPU per rank, the local rank's). Rank 0 alone logs, evaluates and writes.
//!
//! It writes `metrics.json` (every step's losses and time, the step profile, the evaluation) and
//! `loss.png` (the loss curves of the fused run and of the stock-op composition from the same
//! start) to `--out`, and ends with recall and mAP at IoU 0.5 on held-out images.

#[path = "../common/chart.rs"]
mod chart;
mod data;
mod eval;
mod heads;
mod model;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_detloss::dist::{self, Backend, DdpOptions, DistributedDataParallel, GroupOptions};
use tch_detloss::task_modules::GtBatch;

const USAGE: &str = "usage: cargo run --release --example train -- [OPTIONS]
  --head H           atss, gfl, fcos, rtmdet or tood (default atss)
  --steps N          training steps (default 1500)
  --batch B          images per step, over all ranks (default 8)
  --size S           image side in pixels (default 128)
  --lr LR            base learning rate of SGD (default 0.02; momentum 0.9, weight decay 1e-4)
  --warmup N         linear warm-up steps (default 100)
  --unfused          train with the stock libtorch composition of the losses instead
  --compare N        after training, run N steps of the other kind from the same start for the
                     plot and the profile (default 60; 0: none)
  --eval N           held-out images to evaluate (default 200)
  --device D         cpu or cuda (default cpu)
  --seed S           data and initialisation seed (default 0)
  --out DIR          where metrics.json and loss.png go (default target/train_<head>)
  --quiet            no progress bar
  --check            a short run that must learn (make test): 120 steps of 8 images, no plot;
                     fails unless the loss falls by 30 % and fused and unfused agree at step 0
Under torchrun (WORLD_SIZE set), it trains data-parallel: Gloo on the CPU, NCCL with --device cuda.";

struct Options {
    head: String,
    steps: i64,
    batch: i64,
    size: i64,
    lr: f64,
    warmup: i64,
    unfused: bool,
    compare: i64,
    eval: i64,
    device: Device,
    seed: u64,
    out: Option<PathBuf>,
    quiet: bool,
    check: bool,
}

impl Options {
    fn parse() -> Result<Option<Self>> {
        let mut o = Options {
            head: "atss".into(),
            steps: 1500,
            batch: 8,
            size: 128,
            lr: 0.02,
            warmup: 100,
            unfused: false,
            compare: 60,
            eval: 200,
            device: Device::Cpu,
            seed: 0,
            out: None,
            quiet: false,
            check: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut val = || args.next().with_context(|| format!("{a} needs a value"));
            match a.as_str() {
                "--head" => o.head = val()?,
                "--steps" => o.steps = val()?.parse()?,
                "--batch" => o.batch = val()?.parse()?,
                "--size" => o.size = val()?.parse()?,
                "--lr" => o.lr = val()?.parse()?,
                "--warmup" => o.warmup = val()?.parse()?,
                "--unfused" => o.unfused = true,
                "--compare" => o.compare = val()?.parse()?,
                "--eval" => o.eval = val()?.parse()?,
                "--device" => {
                    o.device = match val()?.as_str() {
                        "cpu" => Device::Cpu,
                        "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
                        "cuda" => bail!("--device cuda: no CUDA device is available"),
                        d => bail!("unknown device {d} (cpu, cuda)"),
                    }
                }
                "--seed" => o.seed = val()?.parse()?,
                "--out" => o.out = Some(PathBuf::from(val()?)),
                "--quiet" => o.quiet = true,
                "--check" => {
                    (o.check, o.quiet) = (true, true);
                    (o.steps, o.batch, o.warmup, o.compare, o.eval) = (120, 8, 10, 1, 16);
                }
                "--bench" => {}
                "-h" | "--help" => return Ok(None),
                _ => bail!("unknown option {a}\n{USAGE}"),
            }
        }
        if !heads::NAMES.contains(&o.head.as_str()) {
            bail!("unknown head {} ({})", o.head, heads::NAMES.join(", "));
        }
        if o.steps < 1 || o.batch < 1 || o.size < 64 || o.size % 32 != 0 {
            bail!("need --steps >= 1, --batch >= 1 and --size a multiple of 32, at least 64");
        }
        Ok(Some(o))
    }

    /// Where the outputs go: `--out`, or `target/train_<head>` (`_check` for `--check`).
    fn out_dir(&self) -> PathBuf {
        let check = if self.check { "_check" } else { "" };
        self.out
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("target/train_{}{check}", self.head)))
    }
}

/// A batch of training images (`(B, 3, S, S)` on `device`) and their padded ground truths.
fn batch(seed: u64, first: u64, b: i64, size: i64, device: Device) -> Result<(Tensor, GtBatch)> {
    let (samples, images) = data::samples(seed, first, b, size, device);
    let boxes: Vec<Tensor> = samples.iter().map(|s| s.boxes.to_device(device)).collect();
    let labels: Vec<Tensor> = samples.iter().map(|s| s.labels.to_device(device)).collect();
    Ok((images, GtBatch::pad(&boxes, &labels)?))
}

/// Times of one step's phases, in ms.
#[derive(Default, Clone, Copy)]
struct Phases {
    forward: f64,
    targets: f64,
    losses: f64,
    backward: f64,
    optimizer: f64,
}

impl Phases {
    fn total(&self) -> f64 {
        self.forward + self.targets + self.losses + self.backward + self.optimizer
    }
    fn add(&mut self, o: &Phases) {
        self.forward += o.forward;
        self.targets += o.targets;
        self.losses += o.losses;
        self.backward += o.backward;
        self.optimizer += o.optimizer;
    }
    fn scaled(&self, k: f64) -> Phases {
        Phases {
            forward: self.forward * k,
            targets: self.targets * k,
            losses: self.losses * k,
            backward: self.backward * k,
            optimizer: self.optimizer * k,
        }
    }
    fn json(&self) -> Value {
        json!({"forward_ms": self.forward, "targets_ms": self.targets, "losses_ms": self.losses,
               "backward_ms": self.backward, "optimizer_ms": self.optimizer, "step_ms": self.total()})
    }
}

/// One training step; returns the loss terms and the phase times (synchronising the device
/// between phases only when `timed`).
#[allow(clippy::too_many_arguments)]
fn step(
    net: &model::Detector,
    mut ddp: Option<&mut DistributedDataParallel>,
    opt: &mut nn::Optimizer,
    images: &Tensor,
    gts: &GtBatch,
    s: i64,
    fused: bool,
    timed: bool,
) -> Result<(Vec<f64>, Phases)> {
    let dev = images.device();
    let sync = || {
        if timed {
            if let Device::Cuda(i) = dev {
                tch::Cuda::synchronize(i as i64);
            }
        }
    };
    let mut p = Phases::default();
    let t0 = Instant::now();
    if let Some(d) = ddp.as_deref_mut() {
        d.prepare_forward()?;
    }
    let out = net.forward_t(images, true);
    sync();
    let t1 = Instant::now();
    let targets = net.head.targets(&out, gts, s)?;
    sync();
    let t2 = Instant::now();
    let terms = net.head.losses(&out, &targets, fused)?;
    let total = terms
        .iter()
        .skip(1)
        .fold(terms[0].shallow_clone(), |t, x| t + x);
    sync();
    let t3 = Instant::now();
    opt.zero_grad();
    match ddp {
        // The gradients are averaged over the ranks while backward runs.
        Some(d) => d.backward(&total)?,
        None => total.backward(),
    }
    sync();
    let t4 = Instant::now();
    opt.step();
    sync();
    let t5 = Instant::now();
    let ms = |x: Instant, y: Instant| (y - x).as_secs_f64() * 1e3;
    (p.forward, p.targets, p.losses, p.backward, p.optimizer) =
        (ms(t0, t1), ms(t1, t2), ms(t2, t3), ms(t3, t4), ms(t4, t5));
    // The values are read after the step, for the log: averaged over the ranks, the loss of the
    // whole batch.
    let terms = dist::reduce_mean(&Tensor::stack(&terms, 0).detach())?;
    Ok((Vec::<f64>::try_from(terms.to_kind(Kind::Double))?, p))
}

fn lr_at(o: &Options, s: i64) -> f64 {
    // MMDetection's linear warm-up from 0.001 of the base, then steps of 0.1 at 2/3 and 11/12.
    let warm = if s < o.warmup {
        0.001 + (1.0 - 0.001) * s as f64 / o.warmup as f64
    } else {
        1.0
    };
    let decay = if s >= o.steps * 11 / 12 {
        0.01
    } else if s >= o.steps * 2 / 3 {
        0.1
    } else {
        1.0
    };
    o.lr * warm * decay
}

struct Run {
    names: &'static [&'static str],
    losses: Vec<Vec<f64>>,
    step_ms: Vec<f64>,
    phases: Phases,
    timed_steps: usize,
}

impl Run {
    /// Each step's loss terms and time, as metrics.json lists them.
    fn curve(&self) -> Value {
        let steps = self
            .losses
            .iter()
            .zip(&self.step_ms)
            .enumerate()
            .map(|(s, (l, ms))| {
                let mut v = json!({"step": s, "step_ms": ms});
                for (name, x) in self.names.iter().zip(l) {
                    v[*name] = json!(x);
                }
                v
            });
        Value::Array(steps.collect())
    }

    /// The total loss of each step, smoothed for the plot.
    fn smoothed_total(&self) -> Vec<(f64, f64)> {
        let totals: Vec<f64> = self.losses.iter().map(|l| l.iter().sum()).collect();
        ema(&totals, 0.9)
            .into_iter()
            .enumerate()
            .map(|(s, v)| (s as f64, v))
            .collect()
    }
}

/// Trains `steps` steps from the model in `vs` (a fresh optimizer), fused or not.
fn train(
    o: &Options,
    vs: &nn::VarStore,
    net: &model::Detector,
    steps: i64,
    fused: bool,
    label: &str,
) -> Result<Run> {
    let mut opt = nn::Sgd {
        momentum: 0.9,
        dampening: 0.0,
        wd: 1e-4,
        nesterov: false,
    }
    .build(vs, o.lr)?;
    // DDP checks the parameters on every rank and hands out rank 0's.
    let mut ddp = match dist::default_group() {
        Some(g) => Some(DistributedDataParallel::new(
            vs,
            &g,
            &DdpOptions::default(),
        )?),
        None => None,
    };
    let (rank, per) = (dist::rank() as i64, o.batch / dist::world_size() as i64);
    let bar = if o.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg} ETA {eta}")?
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    let mut run = Run {
        names: net.head.loss_names(),
        losses: Vec::new(),
        step_ms: Vec::new(),
        phases: Phases::default(),
        timed_steps: 0,
    };
    for s in 0..steps {
        opt.set_lr(lr_at(o, s));
        // This rank's slice of the batch: every rank walks the same images in the same order.
        let first = (s * o.batch + rank * per) as u64;
        let (images, gts) = batch(o.seed, first, per, o.size, o.device)?;
        // The step profile skips the first steps (allocator and thread-pool warm-up).
        let timed = s >= 5;
        let start = Instant::now();
        let (l, p) = step(net, ddp.as_mut(), &mut opt, &images, &gts, s, fused, timed)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if timed {
            run.phases.add(&p);
            run.timed_steps += 1;
        }
        let terms: Vec<String> = run
            .names
            .iter()
            .zip(&l)
            .map(|(n, x)| format!("{} {x:.3}", n.trim_start_matches("loss_")))
            .collect();
        bar.set_message(format!(
            "loss {:.3} ({}) {ms:.0} ms/step",
            l.iter().sum::<f64>(),
            terms.join(" ")
        ));
        run.losses.push(l);
        run.step_ms.push(ms);
        bar.inc(1);
    }
    bar.finish();
    if run.timed_steps > 0 {
        run.phases = run.phases.scaled(1.0 / run.timed_steps as f64);
    }
    Ok(run)
}

fn evaluate(o: &Options, net: &model::Detector) -> Result<(f64, f64)> {
    let _guard = tch::no_grad_guard();
    let mut dets = Vec::new();
    let (mut boxes, mut labels) = (Vec::new(), Vec::new());
    let eval_seed = o.seed.wrapping_add(1_000_003);
    let mut i = 0;
    while i < o.eval {
        let b = o.batch.min(o.eval - i);
        let (samples, images) = data::samples(eval_seed, i as u64, b, o.size, o.device);
        let (scores, decoded) = net.head.predict(&net.forward_t(&images, false))?;
        dets.extend(eval::detect(&scores, &decoded));
        boxes.extend(samples.iter().map(|s| s.boxes.shallow_clone()));
        labels.extend(samples.iter().map(|s| s.labels.shallow_clone()));
        i += b;
    }
    Ok(eval::recall_and_map(
        &dets,
        &boxes,
        &labels,
        data::CLASSES.len() as i64,
    ))
}

fn ema(xs: &[f64], k: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(xs.len());
    let mut m = xs.first().copied().unwrap_or(0.0);
    for &x in xs {
        m = k * m + (1.0 - k) * x;
        out.push(m);
    }
    out
}

/// The short run of `make test`: the total loss (mean of 10 steps) falls by at least 30 % from
/// the first steps to the last, and fused and unfused give the same step-0 loss to float32
/// rounding (the same weights and batch; sums of a few thousand terms).
fn check(run: &Run, other: Option<&Run>) -> Result<()> {
    let total = |l: &Vec<f64>| l.iter().sum::<f64>();
    let mean = |xs: &[Vec<f64>]| xs.iter().map(total).sum::<f64>() / xs.len() as f64;
    let n = run.losses.len();
    let (first, last) = (mean(&run.losses[..10]), mean(&run.losses[n - 10..]));
    let other = other.context("--check compares with the other kind of losses")?;
    let (a, b) = (total(&run.losses[0]), total(&other.losses[0]));
    println!(
        "check: loss {first:.4} -> {last:.4} ({:.0} % lower); step 0: {a:.7} vs {b:.7}",
        100.0 * (1.0 - last / first)
    );
    // Written so that a NaN loss fails too.
    let fell = last <= 0.7 * first;
    let agree = (a - b).abs() <= 1e-5 * a.abs().max(1.0);
    if !fell {
        bail!("check failed: the loss fell from {first} to {last}, less than 30 %");
    }
    if !agree {
        bail!("check failed: step-0 loss {a} (fused) against {b} (unfused)");
    }
    Ok(())
}

/// Under torchrun: the default process group (Gloo on the CPU, Gloo and NCCL with CUDA, each
/// rank on its local rank's GPU).
fn init_distributed(o: &mut Options) -> Result<()> {
    if std::env::var_os("WORLD_SIZE").is_none() {
        return Ok(());
    }
    let backend = if o.device.is_cuda() {
        Backend::GlooNccl
    } else {
        Backend::Gloo
    };
    let g = dist::init_process_group(&GroupOptions {
        backend,
        ..Default::default()
    })?;
    if o.device.is_cuda() {
        o.device = Device::Cuda(g.local_rank());
    }
    if o.batch % g.world_size() as i64 != 0 {
        bail!(
            "--batch {} does not split over {} ranks",
            o.batch,
            g.world_size()
        );
    }
    Ok(())
}

/// A checksum of the parameters, to show that every rank holds the same model (not of the
/// buffers: the batch-norm statistics of the last step are each rank's own, as in PyTorch's DDP,
/// which hands out rank 0's at the next forward).
fn checksum(vs: &nn::VarStore) -> f64 {
    let mut vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.iter()
        .enumerate()
        .map(|(i, (_, t))| {
            (i as f64 + 1.0) * t.to_kind(Kind::Double).sum(Kind::Double).double_value(&[])
        })
        .sum()
}

fn main() -> Result<()> {
    let Some(mut o) = Options::parse()? else {
        println!("{USAGE}");
        return Ok(());
    };
    init_distributed(&mut o)?;
    let (rank, world) = (dist::rank(), dist::world_size());
    let leader = rank == 0;
    // The other ranks train in silence; rank 0 logs, evaluates and writes.
    o.quiet |= !leader;
    let say = |m: String| {
        if leader {
            println!("{m}");
        }
    };
    let out_dir = o.out_dir();
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    tch::manual_seed(o.seed as i64);
    let setup = heads::Setup {
        batch: o.batch / world as i64,
        size: o.size,
        device: o.device,
        // MMDetection's TOOD config trains its first 4 of 12 epochs on the initial targets.
        initial_steps: o.steps / 3,
    };
    let classes = data::CLASSES.len() as i64;
    let build = |vs: &nn::VarStore| -> Result<model::Detector> {
        Ok(model::Detector {
            body: model::Body::new(&vs.root()),
            head: heads::build(&o.head, &vs.root(), classes, &setup)?,
        })
    };
    let mut vs = nn::VarStore::new(o.device);
    let net = build(&vs)?;
    // The comparison run starts from the same weights.
    let mut start = nn::VarStore::new(o.device);
    let _ = build(&start)?;
    start.copy(&vs)?;
    let fused = !o.unfused;
    let (main_name, other_name) = if fused {
        ("fused", "unfused")
    } else {
        ("unfused", "fused")
    };
    let ranks = if world > 1 {
        format!(
            " over {world} ranks ({} images each, {})",
            o.batch / world as i64,
            dist::default_group().map_or(String::new(), |g| g.backend().to_string())
        )
    } else {
        String::new()
    };
    say(format!(
        "train {}: {} steps of {} images ({}x{} px, {} priors each) on {:?}{ranks}, {} losses; {} threads",
        o.head, o.steps, o.batch, o.size, o.size, net.head.num_priors(), o.device, main_name, tch::get_num_threads()
    ));
    let t0 = Instant::now();
    let run = train(&o, &vs, &net, o.steps, fused, main_name)?;
    let train_s = t0.elapsed().as_secs_f64();
    if let Some(g) = dist::default_group() {
        // Every rank says it, and rank 0 checks that all of them hold one model.
        let sum = checksum(&vs);
        println!(
            "rank {rank} of {world}: parameter checksum {sum:.9e} after {} steps",
            o.steps
        );
        let all = g.all_gather(&Tensor::from(sum))?;
        all.wait(None)?;
        for (r, t) in all.outputs().iter().enumerate() {
            if t.double_value(&[]) != sum {
                bail!("rank {r} holds other parameters than rank {rank}");
            }
        }
        say(format!("all {world} ranks hold the same parameters"));
    }
    let (recall, map) = if leader {
        evaluate(&o, &net)?
    } else {
        (f64::NAN, f64::NAN)
    };
    say(format!("held-out: recall@0.5 {recall:.3}, mAP@0.5 {map:.3} over {} images; training took {train_s:.0} s", o.eval));
    // The same start, the other kind of losses, for the plot and the step profile.
    let mut other = None;
    if o.compare > 0 {
        vs.copy(&start)?;
        tch::manual_seed(o.seed as i64);
        other = Some(train(
            &o,
            &vs,
            &net,
            o.compare.min(o.steps),
            !fused,
            other_name,
        )?);
    }
    let share = |p: &Phases| (p.targets + p.losses) / p.total();
    let mut metrics = json!({
        "head": o.head, "steps": o.steps, "batch": o.batch, "size": o.size, "device": format!("{:?}", o.device),
        "world_size": world,
        "losses": main_name, "seed": o.seed, "train_seconds": train_s,
        "eval": {"images": o.eval, "recall_iou50": recall, "map_iou50": map},
        "profile": {main_name: run.phases.json()},
        "curve": {main_name: run.curve()},
    });
    say(format!(
        "step profile ({main_name}, mean of {} steps): {:.1} ms = forward {:.1} + targets {:.1} + losses {:.1} + backward {:.1} + optimizer {:.1}; targets and losses {:.0} %",
        run.timed_steps, run.phases.total(), run.phases.forward, run.phases.targets, run.phases.losses, run.phases.backward, run.phases.optimizer, 100.0 * share(&run.phases)
    ));
    if let Some(r) = &other {
        metrics["profile"][other_name] = r.phases.json();
        metrics["curve"][other_name] = r.curve();
        let first = |x: &Run| x.losses[0].iter().sum::<f64>();
        metrics["step0_loss"] = json!({main_name: first(&run), other_name: first(r)});
        if r.timed_steps > 0 {
            say(format!(
                "step profile ({other_name}, mean of {} steps): {:.1} ms; targets and losses {:.0} %",
                r.timed_steps,
                r.phases.total(),
                100.0 * share(&r.phases)
            ));
        }
        say(format!(
            "step 0 loss {:.7} ({main_name}) vs {:.7} ({other_name})",
            first(&run),
            first(r)
        ));
    }
    if o.check {
        // The logged losses are the ranks' mean: every rank checks the same numbers.
        return check(&run, other.as_ref());
    }
    if !leader {
        return Ok(());
    }
    let path = out_dir.join("metrics.json");
    std::fs::write(&path, serde_json::to_string_pretty(&metrics)?)?;
    let mut series = vec![chart::Series {
        name: format!("{main_name} (total)"),
        color: chart::PALETTE[0],
        points: run.smoothed_total(),
    }];
    if let Some(r) = &other {
        series.push(chart::Series {
            name: format!("{other_name} (total)"),
            color: chart::PALETTE[1],
            points: r.smoothed_total(),
        });
    }
    let chart = chart::LineChart {
        title: format!(
            "{} on shapes: training loss (EMA 0.9), recall@0.5 {recall:.2}, mAP@0.5 {map:.2}",
            heads::title(&o.head)
        ),
        x_label: "step".into(),
        y_label: "loss".into(),
        series,
        log_y: false,
    };
    let png = out_dir.join("loss.png");
    chart.save(&png, 800, 480)?;
    println!("wrote {} and {}", path.display(), png.display());
    Ok(())
}
