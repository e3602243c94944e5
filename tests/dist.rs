//! `tch_detloss::dist` on the CPU with Gloo: every multi-process test starts its ranks as child
//! processes of this binary (the ignored test `worker`, told its part by the environment, as
//! torchrun would), on 127.0.0.1 only and each under a timeout.
//!
//! - collectives on 2 and 3 ranks against values worked out by hand;
//! - the key test: steps of a small detector head with MMDetection's losses on 2 ranks x 4 images
//!   give the parameters of 1 process x 8 images, also with `no_sync` accumulation and with an
//!   unused parameter, and `reduce_mean` gives every rank MMDetection's `avg_factor`;
//! - faults: a rank killed or gone mid-step, tensors that differ across ranks, a wrong or missing
//!   rendezvous, a port in use: errors in bounded time, no hang, no abort.
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_detloss::dist::{
    self, DdpOptions, DistributedDataParallel, GroupOptions, ProcessGroup, ReduceOp, Rendezvous,
    Store,
};
use tch_detloss::{registry, Loss, LossArgs};

// ------------------------------------------------------------------------------------------
// The launcher
// ------------------------------------------------------------------------------------------

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

struct Rank {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// A folder of its own for one launch.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tch-detloss-dist-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch folder");
    dir
}

/// Starts `world` ranks of `scenario` and waits for all of them, killing every one and failing
/// the test when `timeout` passes first.
fn launch(scenario: &str, world: usize, out: &Path, timeout: Duration) -> Vec<Rank> {
    let port = free_port();
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut children: Vec<(Child, PathBuf, PathBuf)> = (0..world)
        .map(|r| {
            let (o, e) = (
                out.join(format!("rank{r}.out")),
                out.join(format!("rank{r}.err")),
            );
            let child = Command::new(&exe)
                .args([
                    "worker",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env("DL_DIST_SCENARIO", scenario)
                .env("DL_DIST_OUT", out)
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("RANK", r.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env_remove("TORCHELASTIC_USE_AGENT_STORE")
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&o).unwrap())
                .stderr(std::fs::File::create(&e).unwrap())
                .spawn()
                .expect("start a rank");
            (child, o, e)
        })
        .collect();
    let deadline = Instant::now() + timeout;
    let mut status: Vec<Option<ExitStatus>> = vec![None; world];
    while status.iter().any(Option::is_none) {
        for (i, (c, _, _)) in children.iter_mut().enumerate() {
            if status[i].is_none() {
                status[i] = c.try_wait().expect("poll a rank");
            }
        }
        if Instant::now() > deadline {
            for (c, _, _) in &mut children {
                let _ = c.kill();
                let _ = c.wait();
            }
            let logs: Vec<String> = children
                .iter()
                .map(|(_, o, e)| {
                    format!(
                        "{}{}",
                        std::fs::read_to_string(o).unwrap_or_default(),
                        std::fs::read_to_string(e).unwrap_or_default()
                    )
                })
                .collect();
            panic!(
                "{scenario}: the ranks did not end within {timeout:?}:\n{}",
                logs.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .into_iter()
        .zip(status)
        .map(|((_, o, e), s)| Rank {
            status: s.unwrap(),
            stdout: std::fs::read_to_string(o).unwrap_or_default(),
            stderr: std::fs::read_to_string(e).unwrap_or_default(),
        })
        .collect()
}

fn assert_all_ok(scenario: &str, ranks: &[Rank]) {
    for (r, k) in ranks.iter().enumerate() {
        assert!(
            k.status.success(),
            "{scenario}: rank {r} failed ({}):\n{}\n{}",
            k.status,
            k.stdout,
            k.stderr
        );
    }
}

/// One rank of a multi-process test: what it does comes from `DL_DIST_SCENARIO`.
#[test]
#[ignore = "a rank of the multi-process tests, which start it themselves"]
fn worker() {
    let scenario = std::env::var("DL_DIST_SCENARIO")
        .expect("worker is a rank of the multi-process tests of tests/dist.rs, which start it");
    let out = PathBuf::from(std::env::var("DL_DIST_OUT").expect("DL_DIST_OUT"));
    tch::set_num_threads(1);
    let r = match scenario.as_str() {
        "collectives" => collectives(),
        "mismatch" => mismatch(),
        "killed" => peer_fault(&out, true),
        "exits" => peer_fault(&out, false),
        s => match s.strip_prefix("train-") {
            Some(mode) => train_rank(mode, &out),
            None => panic!("unknown scenario {s}"),
        },
    };
    if let Err(e) = r {
        panic!(
            "{scenario} on rank {}: {e:#}",
            std::env::var("RANK").unwrap()
        );
    }
}

/// The group every rank of these tests builds: Gloo on 127.0.0.1, errors within 30 s.
fn group() -> Result<ProcessGroup> {
    ProcessGroup::from_env(&GroupOptions {
        gloo_host: Some("127.0.0.1".into()),
        timeout: Duration::from_secs(30),
        ..Default::default()
    })
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn expect(what: &str, got: &Tensor, want: &[f64]) -> Result<()> {
    let g = values(got);
    if g != want {
        bail!("{what}: {g:?}, expected {want:?}");
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Collectives
// ------------------------------------------------------------------------------------------

fn collectives() -> Result<()> {
    let g = group()?;
    let (r, n) = (g.rank() as f64, g.world_size() as f64);
    let f = |v: &[f64]| Tensor::from_slice(v).to_kind(Kind::Float);
    // Sums of 1..=n, of the ranks, their product and extremes.
    let t = f(&[r + 1.0, 2.0 * (r + 1.0)]);
    g.all_reduce(&t, ReduceOp::Sum)?.wait(None)?;
    let tri = n * (n + 1.0) / 2.0;
    expect("sum", &t, &[tri, 2.0 * tri])?;
    let t = f(&[r + 1.0]);
    g.all_reduce(&t, ReduceOp::Avg)?.wait(None)?;
    expect("avg", &t, &[(n + 1.0) / 2.0])?;
    let t = f(&[r + 1.0]);
    g.all_reduce(&t, ReduceOp::Product)?.wait(None)?;
    expect("product", &t, &[(1..=n as i64).product::<i64>() as f64])?;
    let t = f(&[r, -r]);
    g.all_reduce(&t, ReduceOp::Max)?.wait(None)?;
    expect("max", &t, &[n - 1.0, 0.0])?;
    let t = f(&[r, -r]);
    g.all_reduce(&t, ReduceOp::Min)?.wait(None)?;
    expect("min", &t, &[0.0, -(n - 1.0)])?;
    let t = Tensor::from_slice(&[g.rank() as i64 * 1_000_000_007]);
    g.all_reduce(&t, ReduceOp::Sum)?.wait(None)?;
    expect("int64 sum", &t, &[(tri - n) * 1_000_000_007.0])?;
    // Coalesced: two tensors of the rank, summed in one collective.
    let a = f(&[r]);
    let b = Tensor::full([2, 3], r, (Kind::Float, Device::Cpu));
    g.all_reduce_coalesced(&[a.shallow_clone(), b.shallow_clone()], ReduceOp::Sum)?
        .wait(None)?;
    expect("coalesced a", &a, &[tri - n])?;
    expect("coalesced b", &b, &[tri - n; 6])?;
    // Broadcast from the last rank.
    let t = Tensor::full([3], r, (Kind::Double, Device::Cpu));
    g.broadcast(&t, g.world_size() - 1)?.wait(None)?;
    expect("broadcast", &t, &[n - 1.0; 3])?;
    // All-gather, in rank order.
    let w = g.all_gather(&f(&[r, 10.0 * r]))?;
    w.wait(Some(Duration::from_secs(20)))?;
    if w.outputs().len() != g.world_size() {
        bail!("all_gather: {} tensors", w.outputs().len());
    }
    for (i, o) in w.outputs().iter().enumerate() {
        expect("all_gather", o, &[i as f64, 10.0 * i as f64])?;
    }
    // The store counts every rank; the barrier orders the count after every add.
    let store = Store::tcp(
        "127.0.0.1",
        std::env::var("MASTER_PORT")?.parse()?,
        g.world_size(),
        false,
        Duration::from_secs(10),
    )?;
    store.add("ranks", 1)?;
    g.barrier()?.wait(None)?;
    let count = store.add("ranks", 0)?;
    if count != g.world_size() as i64 {
        bail!("store counter {count} after the barrier");
    }
    // reduce_mean as MMDetection's: the mean over the ranks, integer counts in float32, and the
    // tensor itself with no default group.
    let num_pos = Tensor::from(r as f32 + 1.0);
    let before = dist::reduce_mean(&num_pos)?;
    expect("reduce_mean without a group", &before, &[r + 1.0])?;
    if dist::world_size() != 1 || dist::rank() != 0 || dist::is_initialized() {
        bail!("no default group: world_size 1, rank 0");
    }
    dist::set_default_group(g.clone())?;
    if dist::world_size() != g.world_size() || dist::rank() != g.rank() || !dist::is_initialized() {
        bail!("the default group's rank and size");
    }
    let m = dist::reduce_mean(&num_pos)?;
    expect("reduce_mean", &m, &[(n + 1.0) / 2.0])?;
    expect("reduce_mean leaves its input", &num_pos, &[r + 1.0])?;
    let m = dist::reduce_mean(&Tensor::from(g.rank() as i64 * 3))?;
    if m.kind() != Kind::Float {
        bail!("reduce_mean of int64 gives {:?}", m.kind());
    }
    expect("reduce_mean of int64", &m, &[3.0 * (n - 1.0) / 2.0])?;
    dist::destroy_process_group();
    if dist::is_initialized() {
        bail!("destroy_process_group");
    }
    println!("collectives ok on rank {r} of {n}");
    Ok(())
}

#[test]
fn collectives_on_2_and_3_ranks() {
    for world in [2, 3] {
        let out = scratch(&format!("collectives{world}"));
        let ranks = launch("collectives", world, &out, Duration::from_secs(120));
        assert_all_ok("collectives", &ranks);
    }
}

// ------------------------------------------------------------------------------------------
// Faults
// ------------------------------------------------------------------------------------------

/// Tensors that differ across ranks: an error on every rank, naming the other rank's call; the
/// group stays usable.
fn mismatch() -> Result<()> {
    let g = group()?;
    let r = g.rank();
    let expect_err = |what: &str, res: Result<dist::Work>, needle: &str| -> Result<()> {
        match res.and_then(|w| w.wait(None)) {
            Ok(()) => bail!("{what}: no error"),
            Err(e) => {
                let msg = format!("{e:#}");
                if !msg.contains("the ranks disagree") || !msg.contains(needle) {
                    bail!("{what}: the error does not say what differs: {msg}");
                }
                println!("{what}: {msg}");
                Ok(())
            }
        }
    };
    let shape = Tensor::zeros([4 - r as i64], (Kind::Float, Device::Cpu));
    expect_err(
        "shapes",
        g.all_reduce(&shape, ReduceOp::Sum),
        &format!(
            "rank {} calls all_reduce(sum) of a float32 tensor [{}]",
            1 - r,
            3 + r
        ),
    )?;
    let kind = if r == 0 { Kind::Float } else { Kind::Double };
    let dtype = Tensor::zeros([2], (kind, Device::Cpu));
    expect_err("dtypes", g.all_reduce(&dtype, ReduceOp::Sum), "float64")?;
    let t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    let op = if r == 0 {
        g.all_reduce(&t, ReduceOp::Sum)
    } else {
        g.broadcast(&t, 0)
    };
    expect_err("ops", op, "broadcast from rank 0")?;
    // Still one group: an agreed collective works.
    let t = Tensor::from_slice(&[1.0f32]);
    g.all_reduce(&t, ReduceOp::Sum)?.wait(None)?;
    expect("after the errors", &t, &[2.0])?;
    Ok(())
}

#[test]
fn tensors_that_differ_across_ranks_are_an_error() {
    let out = scratch("mismatch");
    let ranks = launch("mismatch", 2, &out, Duration::from_secs(120));
    assert_all_ok("mismatch", &ranks);
}

/// Rank 1 dies (SIGKILL, or a plain exit) after a full step, in the middle of the next one;
/// rank 0's backward pass and its next collective must fail with a clear error.
fn peer_fault(out: &Path, kill: bool) -> Result<()> {
    let g = group()?;
    dist::set_default_group(g.clone())?;
    let head = ToyHead::new(0, false);
    let mut ddp = DistributedDataParallel::new(&head.vs, &g, &DdpOptions::default())?;
    let losses = Losses::new()?;
    let rank = g.rank();
    for step in 0..2 {
        ddp.prepare_forward()?;
        let (loss, _) = losses.of(&head, 8 * step + 4 * rank, 4)?;
        if step == 1 && rank == 1 {
            if kill {
                let _ = Command::new("kill")
                    .args(["-KILL", &std::process::id().to_string()])
                    .status();
                std::thread::sleep(Duration::from_secs(60));
            }
            std::process::exit(0);
        }
        let start = Instant::now();
        match ddp.backward(&loss) {
            Ok(()) if step == 0 => {}
            Ok(()) => bail!("backward with a dead peer succeeded"),
            Err(e) => {
                let secs = start.elapsed().as_secs_f64();
                let msg = format!("{e:#}");
                if step == 0 {
                    bail!("the first step failed: {msg}");
                }
                if !msg.contains("DistributedDataParallel::backward on rank 0 of 2 (gloo)") {
                    bail!("the error does not name the step and the rank: {msg}");
                }
                let t = Tensor::from_slice(&[1.0f32]);
                let next = g.all_reduce(&t, ReduceOp::Sum).and_then(|w| w.wait(None));
                let next = match next {
                    Ok(()) => bail!("an all_reduce with a dead peer succeeded"),
                    Err(e) => format!("{e:#}"),
                };
                if !next.contains("all_reduce(sum) on rank 0 of 2 (gloo)") {
                    bail!("the all_reduce error does not name itself and the rank: {next}");
                }
                std::fs::write(out.join("fault.txt"), format!("{secs:.3}\n{msg}\n{next}\n"))?;
                println!("backward failed after {secs:.2} s: {msg}\nnext all_reduce: {next}");
            }
        }
    }
    Ok(())
}

#[test]
fn a_rank_that_dies_mid_step_fails_the_others() {
    for (scenario, killed) in [("killed", true), ("exits", false)] {
        let out = scratch(scenario);
        let start = Instant::now();
        // The group's timeout is 30 s; a dead peer must be noticed well within it.
        let ranks = launch(scenario, 2, &out, Duration::from_secs(90));
        let took = start.elapsed();
        assert!(
            ranks[0].status.success(),
            "{scenario}: rank 0 did not end cleanly ({}):\n{}\n{}",
            ranks[0].status,
            ranks[0].stdout,
            ranks[0].stderr
        );
        if killed {
            assert!(
                !ranks[1].status.success(),
                "{scenario}: rank 1 was not killed"
            );
        }
        let report = std::fs::read_to_string(out.join("fault.txt")).expect("rank 0's fault report");
        let secs: f64 = report.lines().next().unwrap().parse().unwrap();
        assert!(
            secs < 20.0,
            "{scenario}: the error took {secs} s:\n{report}"
        );
        println!("{scenario}: rank 0 failed in {secs:.2} s, all ended in {took:?}:\n{report}");
    }
}

#[test]
fn rendezvous_errors_say_what_is_wrong() {
    let full = |skip: &str, k: &str| -> Option<String> {
        if k == skip {
            return None;
        }
        Some(
            match k {
                "MASTER_ADDR" => "127.0.0.1",
                "MASTER_PORT" => "29500",
                "RANK" => "1",
                "WORLD_SIZE" => "2",
                _ => return None,
            }
            .to_string(),
        )
    };
    let r = Rendezvous::from_vars(|k| full("", k)).unwrap();
    assert_eq!(
        (r.rank, r.world_size, r.local_rank, r.master_port),
        (1, 2, 0, 29500)
    );
    assert!(!r.agent_store);
    for var in ["MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"] {
        let e = Rendezvous::from_vars(|k| full(var, k))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{var} is not set")) && e.contains("torchrun"),
            "{var}: {e}"
        );
    }
    let with = |key: &str, val: &str| {
        let (key, val) = (key.to_string(), val.to_string());
        Rendezvous::from_vars(move |k| {
            if k == key {
                Some(val.clone())
            } else {
                full("", k)
            }
        })
    };
    let e = with("RANK", "2").unwrap_err().to_string();
    assert!(e.contains("RANK=2 is not below WORLD_SIZE=2"), "{e}");
    let e = with("MASTER_PORT", "70000").unwrap_err().to_string();
    assert!(e.contains("MASTER_PORT=\"70000\""), "{e}");
    let e = with("WORLD_SIZE", "two").unwrap_err().to_string();
    assert!(e.contains("WORLD_SIZE=\"two\""), "{e}");
    let e = with("LOCAL_RANK", "-1").unwrap_err().to_string();
    assert!(e.contains("LOCAL_RANK"), "{e}");
    assert!(
        with("TORCHELASTIC_USE_AGENT_STORE", "True")
            .unwrap()
            .agent_store
    );

    // No server at the address: the client gives up after its timeout.
    let start = Instant::now();
    let e = Store::tcp("127.0.0.1", free_port(), 2, false, Duration::from_secs(2))
        .err()
        .expect("a store client without a server");
    let e = format!("{e:#}");
    assert!(e.contains("TCPStore client at 127.0.0.1"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_port_in_use_is_an_error() {
    // Another program listens on the port (a store in this process would share it: c10d's
    // TCPStore is multi-tenant within a process, as torch's).
    for addr in ["0.0.0.0:0", "127.0.0.1:0"] {
        let other = TcpListener::bind(addr).unwrap();
        let port = other.local_addr().unwrap().port();
        let e = Store::tcp("127.0.0.1", port, 1, true, Duration::from_secs(10))
            .err()
            .expect("a store server on a port in use");
        let e = format!("{e:#}");
        assert!(
            e.contains(&format!("TCPStore server at 127.0.0.1:{port}")),
            "{e}"
        );
        assert!(e.to_lowercase().contains("in use"), "{e}");
        println!("{addr}: {e}");
    }
}

#[test]
fn one_process_runs_both_ways() {
    // World size 1 through the real engine: the collectives are identities.
    let store = Store::tcp("127.0.0.1", free_port(), 1, true, Duration::from_secs(10)).unwrap();
    let opts = GroupOptions {
        gloo_host: Some("127.0.0.1".into()),
        ..Default::default()
    };
    let g = ProcessGroup::new(&store, 0, 1, &opts).unwrap();
    let t = Tensor::from_slice(&[3.0f32, 4.0]);
    g.all_reduce(&t, ReduceOp::Avg).unwrap().wait(None).unwrap();
    assert_eq!(values(&t), [3.0, 4.0]);
    assert_eq!(
        values(&g.reduce_mean(&Tensor::from(5.0f32)).unwrap()),
        [5.0]
    );
    let e = ProcessGroup::new(&store, 1, 1, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 1 is not in a world of 1"), "{e}");
    let e = g
        .all_reduce(
            &Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)).tr(),
            ReduceOp::Sum,
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not contiguous"), "{e}");
    // Without NCCL in the build, or without a CUDA device, an NCCL group is a clear error (with
    // both, it is the GPU tests' business).
    let nccl = ProcessGroup::new(
        &store,
        0,
        1,
        &GroupOptions {
            backend: dist::Backend::Nccl,
            ..opts.clone()
        },
    );
    if !dist::nccl_built() {
        let e = nccl.unwrap_err().to_string();
        assert!(e.contains("no NCCL"), "{e}");
    } else if tch::Cuda::device_count() == 0 {
        let e = nccl.unwrap_err().to_string();
        assert!(e.contains("needs CUDA device 0, and 0 are visible"), "{e}");
    }
}

// ------------------------------------------------------------------------------------------
// Equivalence
// ------------------------------------------------------------------------------------------

/// A small dense head on 16 anchors per image: a trunk, classification over 4 classes (label 4
/// is the background), box deltas and centerness, trained with ATSSHead's three losses.
struct ToyHead {
    vs: nn::VarStore,
    trunk: nn::Linear,
    cls: nn::Linear,
    reg: nn::Linear,
    ctr: nn::Linear,
}

const ANCHORS: i64 = 16;
const FEATURES: i64 = 8;

impl ToyHead {
    /// Initialised from `seed` by a formula rather than the global RNG, which the tests running
    /// side by side in this process share; with `unused`, one more layer that no loss reaches.
    fn new(seed: i64, unused: bool) -> Self {
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs.root();
        let c = Default::default();
        let trunk = nn::linear(&p / "trunk", FEATURES, FEATURES, c);
        let cls = nn::linear(&p / "cls", FEATURES, 4, c);
        let reg = nn::linear(&p / "reg", FEATURES, 4, c);
        let ctr = nn::linear(&p / "ctr", FEATURES, 1, c);
        if unused {
            let _ = nn::linear(&p / "unused", FEATURES, 2, c);
        }
        let head = ToyHead {
            vs,
            trunk,
            cls,
            reg,
            ctr,
        };
        let _no_grad = tch::no_grad_guard();
        for (i, (_, mut t)) in head.params().into_iter().enumerate() {
            let v = Tensor::arange(t.numel() as i64, (Kind::Float, Device::Cpu));
            let v = (v * (0.7 + 0.1 * i as f64) + seed as f64).sin() * 0.3;
            t.copy_(&v.view_as(&t));
        }
        head
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Images `first..first + n` of a fixed synthetic set: features, labels, anchors, box targets
/// and centerness targets of their anchors, concatenated.
fn toy_batch(first: usize, n: usize) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
    let (mut x, mut labels, mut anchors, mut targets, mut ctr) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in first..first + n {
        for a in 0..ANCHORS as usize {
            let (fi, fa) = (i as f32, a as f32);
            for f in 0..FEATURES as usize {
                x.push((0.37 * fi + 1.3 * fa + 0.71 * f as f32).sin());
            }
            // About a third of the anchors are positives, a different number per image.
            labels.push(if (i * 5 + a * 3) % 7 < 2 + i % 2 {
                ((i * 7 + a) % 4) as i64
            } else {
                4
            });
            let anchor = [fa * 4.0, fa * 2.0, fa * 4.0 + 10.0, fa * 2.0 + 12.0];
            let shift = (0.9 * fi + fa).sin() * 2.0;
            anchors.extend(anchor);
            targets.extend([
                anchor[0] + shift,
                anchor[1] - shift,
                anchor[2] + 3.0,
                anchor[3] + shift.abs(),
            ]);
            ctr.push(0.3 + 0.6 * (0.5 + 0.5 * (1.7 * fi + fa).cos()));
        }
    }
    let rows = (n as i64) * ANCHORS;
    (
        Tensor::from_slice(&x).view([rows, FEATURES]),
        Tensor::from_slice(&labels),
        Tensor::from_slice(&anchors).view([rows, 4]),
        Tensor::from_slice(&targets).view([rows, 4]),
        Tensor::from_slice(&ctr),
    )
}

/// ATSSHead.loss_by_feat's three losses from MMDetection config dicts, each with its
/// `avg_factor` through `reduce_mean` as there.
struct Losses {
    cls: Box<dyn Loss>,
    bbox: Box<dyn Loss>,
    ctr: Box<dyn Loss>,
}

impl Losses {
    fn new() -> Result<Self> {
        let b = |s: &str| registry::build_str(s);
        Ok(Losses {
            cls: b(
                r#"{"type": "FocalLoss", "use_sigmoid": true, "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0}"#,
            )?,
            bbox: b(r#"{"type": "GIoULoss", "loss_weight": 2.0}"#)?,
            ctr: b(r#"{"type": "CrossEntropyLoss", "use_sigmoid": true, "loss_weight": 1.0}"#)?,
        })
    }

    /// The loss of images `first..first + n` and its classification `avg_factor`.
    fn of(&self, h: &ToyHead, first: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let (x, labels, anchors, targets, ctr_t) = toy_batch(first, n);
        let f = h.trunk.forward(&x).relu();
        let pos = labels.lt(4).to_kind(Kind::Float);
        let avg = dist::reduce_mean(&pos.sum(Kind::Float))?.clamp_min(1.0);
        let loss_cls = self.cls.forward(
            &h.cls.forward(&f),
            (&labels).into(),
            &LossArgs::new().avg_factor(&avg),
        )?;
        let boxes = &anchors + h.reg.forward(&f) * 4.0;
        let w = &ctr_t * &pos;
        let bbox_avg = dist::reduce_mean(&w.sum(Kind::Float))?.clamp_min(1.0);
        let loss_bbox = self.bbox.forward(
            &boxes,
            (&targets).into(),
            &LossArgs::new().weight(&w).avg_factor(1.0),
        )? / bbox_avg;
        let loss_ctr = self.ctr.forward(
            &h.ctr.forward(&f).squeeze_dim(-1),
            (&ctr_t).into(),
            &LossArgs::new().weight(&pos).avg_factor(&avg),
        )?;
        Ok((loss_cls + loss_bbox + loss_ctr, avg))
    }
}

const STEPS: usize = 3;
const BATCH: usize = 8;

/// What one training process saw: each micro-step's (loss, avg_factor), and the parameters.
struct Trained {
    log: Vec<(f64, f64)>,
    params: Vec<(String, Tensor)>,
}

/// `STEPS` steps of SGD with momentum over batches of `BATCH` images, this rank's share of each
/// (a distributed sampler: the same order on every rank, rank r takes its slice), in `micro`
/// micro-batches whose gradients accumulate; with `group`, through DDP.
fn train(mode: &str, group: Option<&ProcessGroup>) -> Result<Trained> {
    let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world_size()));
    let unused = mode == "unused";
    let micro = if mode == "accumulate" { 2 } else { 1 };
    // Every rank starts from its own weights: DDP must hand out rank 0's.
    let head = ToyHead::new(1 + 7 * rank as i64, unused);
    let losses = Losses::new()?;
    let mut ddp = match group {
        Some(g) => Some(DistributedDataParallel::new(
            &head.vs,
            g,
            &DdpOptions {
                find_unused_parameters: unused,
                ..Default::default()
            },
        )?),
        None => None,
    };
    let mut opt = nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(&head.vs, 0.05)?;
    let per = BATCH / micro / world;
    let mut log = Vec::new();
    for s in 0..STEPS {
        opt.zero_grad();
        for m in 0..micro {
            let first = s * BATCH + m * (BATCH / micro) + rank * per;
            let mut run = |d: Option<&mut DistributedDataParallel>| -> Result<()> {
                let (loss, avg) = match d {
                    Some(d) => {
                        d.prepare_forward()?;
                        let (loss, avg) = losses.of(&head, first, per)?;
                        d.backward(&loss)?;
                        (loss, avg)
                    }
                    None => {
                        let (loss, avg) = losses.of(&head, first, per)?;
                        loss.f_backward()?;
                        (loss, avg)
                    }
                };
                log.push((loss.double_value(&[]), avg.double_value(&[])));
                Ok(())
            };
            match ddp.as_mut() {
                Some(d) if m + 1 < micro => d.no_sync(|d| run(Some(d)))?,
                Some(d) => run(Some(d))?,
                None => run(None)?,
            }
        }
        opt.step();
    }
    Ok(Trained {
        log,
        params: head.params(),
    })
}

fn train_rank(mode: &str, out: &Path) -> Result<()> {
    let g = group()?;
    dist::set_default_group(g.clone())?;
    let t = train(mode, Some(&g))?;
    let named: Vec<(&str, &Tensor)> = t.params.iter().map(|(n, p)| (n.as_str(), p)).collect();
    Tensor::save_multi(&named, out.join(format!("params{}.ot", g.rank())))?;
    let log: Vec<String> = t
        .log
        .iter()
        .map(|(l, a)| format!("{l:.9e} {a:.9e}"))
        .collect();
    std::fs::write(out.join(format!("log{}.txt", g.rank())), log.join("\n"))?;
    Ok(())
}

fn read_log(path: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Vec<f64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
            (v[0], v[1])
        })
        .collect()
}

fn equivalence(mode: &str) {
    let reference = train(mode, None)
        .context("the 1-process reference")
        .unwrap();
    let out = scratch(&format!("train-{mode}"));
    let ranks = launch(&format!("train-{mode}"), 2, &out, Duration::from_secs(180));
    assert_all_ok(mode, &ranks);
    for r in 0..2 {
        let got = Tensor::load_multi(out.join(format!("params{r}.ot"))).unwrap();
        assert_eq!(
            got.len(),
            reference.params.len(),
            "{mode}: rank {r}'s parameters"
        );
        for ((name, p), (want_name, want)) in got.iter().zip(&reference.params) {
            assert_eq!(name, want_name);
            let diff = (p - want).abs().max().double_value(&[]);
            let scale = want.abs().max().double_value(&[]).max(1.0);
            assert!(
                diff <= 2e-5 * scale,
                "{mode}: rank {r}'s {name} differs from 1 process x 8 images by {diff}"
            );
        }
    }
    // reduce_mean: every rank divides by the mean positive count of the ranks, which is the
    // count of the whole batch over the world size, and the ranks' losses average to the
    // 1-process loss of the whole batch (the first micro-step, before any update).
    let (l0, l1) = (
        read_log(&out.join("log0.txt")),
        read_log(&out.join("log1.txt")),
    );
    let (ref_loss, ref_avg) = reference.log[0];
    for (r, log) in [&l0, &l1].iter().enumerate() {
        assert!(
            (log[0].1 * 2.0 - ref_avg).abs() < 1e-4,
            "{mode}: rank {r}'s avg_factor {} is not the batch's {ref_avg} / 2",
            log[0].1
        );
    }
    assert!(
        l0[0].1 == l1[0].1,
        "{mode}: the ranks' avg_factors differ: {} and {}",
        l0[0].1,
        l1[0].1
    );
    let mean = (l0[0].0 + l1[0].0) / 2.0;
    assert!(
        (mean - ref_loss).abs() <= 1e-5 * ref_loss.abs(),
        "{mode}: the ranks' losses average to {mean}, 1 process gives {ref_loss}"
    );
}

#[test]
fn two_ranks_of_4_images_train_as_one_process_of_8() {
    equivalence("plain");
}

#[test]
fn no_sync_accumulation_trains_as_one_process() {
    equivalence("accumulate");
}

#[test]
fn an_unused_parameter_with_find_unused_parameters() {
    equivalence("unused");
}

// ------------------------------------------------------------------------------------------
// CUDA (a GPU machine: --features gpu-tests)
// ------------------------------------------------------------------------------------------

#[cfg(feature = "gpu-tests")]
mod gpu {
    use super::*;
    use tch_detloss::cuda::{sync_debug, SyncDebugMode};

    fn world_of_one(backend: dist::Backend) -> ProcessGroup {
        let store = Store::tcp("127.0.0.1", free_port(), 1, true, Duration::from_secs(30)).unwrap();
        let opts = GroupOptions {
            backend,
            gloo_host: Some("127.0.0.1".into()),
            timeout: Duration::from_secs(60),
            ..Default::default()
        };
        ProcessGroup::new(&store, 0, 1, &opts).unwrap()
    }

    #[test]
    fn nccl_world_of_one() {
        assert!(dist::nccl_built(), "this build has no NCCL backend");
        let g = world_of_one(dist::Backend::Nccl);
        let t = Tensor::from_slice(&[1.0f32, 2.0]).to_device(Device::Cuda(0));
        g.all_reduce(&t, ReduceOp::Sum).unwrap().wait(None).unwrap();
        g.barrier().unwrap().wait(None).unwrap();
        assert_eq!(values(&t), [1.0, 2.0]);
        let w = g.all_gather(&t).unwrap();
        w.wait(None).unwrap();
        assert_eq!(values(&w.outputs()[0]), [1.0, 2.0]);
        let e = g
            .all_reduce(&Tensor::from(1.0f32), ReduceOp::Sum)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("on the CPU"), "{e}");
    }

    #[test]
    fn reduce_mean_of_a_device_avg_factor_reads_nothing_back() {
        for backend in [dist::Backend::Nccl, dist::Backend::GlooNccl] {
            let g = world_of_one(backend);
            let num_pos = Tensor::from(37.0f32).to_device(Device::Cuda(0));
            let loss = registry::build_str(r#"{"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25}"#)
                .unwrap();
            let pred =
                Tensor::randn([64, 8], (Kind::Float, Device::Cuda(0))).set_requires_grad(true);
            let labels = Tensor::randint(9, [64], (Kind::Int64, Device::Cuda(0)));
            let l = {
                let _strict = sync_debug(SyncDebugMode::Error).unwrap();
                let avg = g.reduce_mean(&num_pos).unwrap();
                let l = loss
                    .forward(&pred, (&labels).into(), &LossArgs::new().avg_factor(&avg))
                    .unwrap();
                l.backward();
                l
            };
            assert!(l.double_value(&[]).is_finite());
            let avg = g.reduce_mean(&num_pos).unwrap();
            assert_eq!(avg.device(), Device::Cuda(0));
            assert_eq!(values(&avg), [37.0], "{backend}");
        }
    }

    #[test]
    fn gloo_with_cuda_tensors() {
        let g = world_of_one(dist::Backend::Gloo);
        let t = Tensor::from_slice(&[5.0f32, 6.0]).to_device(Device::Cuda(0));
        g.all_reduce(&t, ReduceOp::Max).unwrap().wait(None).unwrap();
        assert_eq!(values(&t), [5.0, 6.0]);
        g.broadcast(&t, 0).unwrap().wait(None).unwrap();
        assert_eq!(t.device(), Device::Cuda(0));
    }
}
