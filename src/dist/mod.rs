//! Data-parallel training on libtorch's own c10d engine: the TCPStore rendezvous, process groups
//! with the Gloo (CPU) and NCCL (CUDA) backends, the collectives, MMDetection's `reduce_mean` and
//! [`DistributedDataParallel`] over DDP's `c10d::Reducer`.
//!
//! This is torch.distributed for tch: the same engine, reached through the small C ABI of
//! `kernels/c10d/`. Under `torchrun`, one call sets up the default group from the environment,
//! and the functions of this module run both ways: with no group, [`world_size`] is 1 and
//! [`reduce_mean`] returns its input.
//!
//! ```no_run
//! use tch::{nn, Device, Kind, Tensor};
//! use tch_detloss::dist::{self, DdpOptions, DistributedDataParallel, GroupOptions};
//!
//! // torchrun --standalone --nproc-per-node 2 --no-python target/release/examples/...
//! let group = dist::init_process_group(&GroupOptions::default())?;
//! let vs = nn::VarStore::new(Device::Cpu);
//! let net = nn::linear(&vs.root() / "fc", 16, 4, Default::default());
//! let mut ddp = DistributedDataParallel::new(&vs, &group, &DdpOptions::default())?;
//! ddp.prepare_forward()?;
//! let x = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
//! let num_pos = Tensor::from(8.0f32);
//! // Every rank divides by the mean count of all ranks, as MMDetection's heads do.
//! let avg_factor = dist::reduce_mean(&num_pos)?;
//! let loss = x.apply(&net).square().sum(Kind::Float) / avg_factor;
//! ddp.backward(&loss)?; // the gradients are averaged over the ranks during backward
//! # anyhow::Ok(())
//! ```
//!
//! Each collective first checks, with a small all-gather of the tensors' fingerprints, that every
//! rank passes the same op, dtypes, shapes and devices: gloo aborts the process on a mismatch,
//! and this makes it an error that names the ranks ([`GroupOptions::check_collectives`]). Every
//! C++ exception, gloo and NCCL error becomes an [`anyhow::Error`] naming the collective and the
//! rank; gloo's own message names the peer's address.
use std::ffi::{c_char, c_void, CString};
use std::fmt;
use std::ptr::NonNull;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};

mod ddp;
pub use ddp::{DdpOptions, DistributedDataParallel};

mod sys {
    use std::ffi::{c_char, c_void};
    extern "C" {
        pub fn dl_c10d_tcp_store(
            host: *const c_char,
            port: u16,
            world_size: i32,
            is_server: i32,
            wait_workers: i32,
            timeout_ms: i64,
            out: *mut *mut c_void,
            err: *mut c_char,
            len: usize,
        ) -> i32;
        pub fn dl_c10d_prefix_store(
            prefix: *const c_char,
            base: *const c_void,
            out: *mut *mut c_void,
            err: *mut c_char,
            len: usize,
        ) -> i32;
        pub fn dl_c10d_store_add(
            store: *mut c_void,
            key: *const c_char,
            delta: i64,
            value: *mut i64,
            err: *mut c_char,
            len: usize,
        ) -> i32;
        pub fn dl_c10d_store_free(store: *mut c_void);
        #[allow(clippy::too_many_arguments)]
        pub fn dl_c10d_group_new(
            store: *const c_void,
            rank: i32,
            size: i32,
            gloo: i32,
            nccl: i32,
            device: i32,
            gloo_host: *const c_char,
            timeout_ms: i64,
            out: *mut *mut c_void,
            err: *mut c_char,
            len: usize,
        ) -> i32;
        pub fn dl_c10d_group_free(group: *mut c_void);
        pub fn dl_c10d_all_reduce(
            group: *mut c_void,
            ts: *const *mut c_void,
            n: usize,
            op: i32,
            coalesced: i32,
            work: *mut *mut c_void,
            err: *mut c_char,
            len: usize,
        ) -> i32;
        pub fn dl_c10d_broadcast(
            group: *mut c_void,
            ts: *const *mut c_void,
            n: usize,
            root: i32,
            work: *mut *mut c_void,
            err: *mut c_char,
            len: usize,
        ) -> i32;
        pub fn dl_c10d_all_gather(
            group: *mut c_void,
            outs: *const *mut c_void,
            n: usize,
            input: *mut c_void,
            work: *mut *mut c_void,
            err: *mut c_char,
            len: usize,
        ) -> i32;
        pub fn dl_c10d_barrier(
            group: *mut c_void,
            work: *mut *mut c_void,
            err: *mut c_char,
            len: usize,
        ) -> i32;
        pub fn dl_c10d_work_wait(
            work: *mut c_void,
            timeout_ms: i64,
            err: *mut c_char,
            len: usize,
        ) -> i32;
        pub fn dl_c10d_work_free(work: *mut c_void);
        pub fn dl_c10d_broadcast_coalesced(
            group: *mut c_void,
            ts: *const *mut c_void,
            n: usize,
            bucket_bytes: i64,
            root: i32,
            err: *mut c_char,
            len: usize,
        ) -> i32;
        #[allow(clippy::too_many_arguments)]
        pub fn dl_c10d_reducer_new(
            group: *mut c_void,
            params: *const *mut c_void,
            n: usize,
            bucket_cap_bytes: i64,
            cap_default: i32,
            find_unused: i32,
            grad_as_bucket_view: i32,
            out: *mut *mut c_void,
            err: *mut c_char,
            len: usize,
        ) -> i32;
        pub fn dl_c10d_reducer_prepare_forward(
            ddp: *mut c_void,
            err: *mut c_char,
            len: usize,
        ) -> i32;
        pub fn dl_c10d_reducer_prepare_backward(
            ddp: *mut c_void,
            outputs: *const *mut c_void,
            n: usize,
            err: *mut c_char,
            len: usize,
        ) -> i32;
        pub fn dl_c10d_reducer_free(ddp: *mut c_void);
        pub fn dl_c10d_default_bucket_cap() -> i64;
    }
}

/// Runs one call of the C ABI with an error buffer; a failure becomes its message.
fn ffi(f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<()> {
    let mut err = [0u8; 2048];
    if f(err.as_mut_ptr().cast(), err.len()) == 0 {
        return Ok(());
    }
    let msg = crate::abi::c_message(&err).trim().to_string();
    Err(anyhow!(if msg.is_empty() {
        "unknown c10d error".to_string()
    } else {
        msg
    }))
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).with_context(|| format!("{what} {s:?} holds a NUL byte"))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

fn ptrs<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> Vec<*mut c_void> {
    ts.into_iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

/// torch.distributed's default timeout of a process group (`default_pg_timeout`): 30 minutes.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Where a process finds its peers: what `torchrun` (and `torch.distributed.launch`) put in the
/// environment, or the same given by hand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendezvous {
    /// The host of the TCPStore (`MASTER_ADDR`).
    pub master_addr: String,
    /// Its port (`MASTER_PORT`).
    pub master_port: u16,
    /// This process's rank, `0..world_size` (`RANK`).
    pub rank: usize,
    /// The number of processes (`WORLD_SIZE`).
    pub world_size: usize,
    /// This process's rank on its machine (`LOCAL_RANK`, 0 when unset): the CUDA device NCCL uses.
    pub local_rank: usize,
    /// Whether torchrun's agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE=True`): then
    /// every rank connects as a client, rank 0 included.
    pub agent_store: bool,
}

impl Rendezvous {
    /// Reads `MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE` and `LOCAL_RANK` from the
    /// environment; the error names what is missing or malformed.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Rendezvous::from_env`] over any source of variables.
    ///
    /// ```
    /// use tch_detloss::dist::Rendezvous;
    /// let vars = |k: &str| match k {
    ///     "MASTER_ADDR" => Some("127.0.0.1".to_string()),
    ///     "MASTER_PORT" => Some("29500".to_string()),
    ///     "RANK" => Some("1".to_string()),
    ///     _ => None,
    /// };
    /// let err = Rendezvous::from_vars(vars).unwrap_err();
    /// assert!(err.to_string().contains("WORLD_SIZE"));
    /// ```
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let hint = "launch with torchrun, or set MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE";
        let get = |k: &str| -> Result<String> {
            match var(k) {
                Some(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
                _ => bail!("rendezvous: the environment variable {k} is not set ({hint})"),
            }
        };
        let number = |k: &str, v: String| -> Result<usize> {
            v.parse()
                .map_err(|_| anyhow!("rendezvous: {k}={v:?} is not a non-negative integer"))
        };
        let master_addr = get("MASTER_ADDR")?;
        let port = get("MASTER_PORT")?;
        let master_port: u16 = port
            .parse()
            .map_err(|_| anyhow!("rendezvous: MASTER_PORT={port:?} is not a port (0-65535)"))?;
        let rank = number("RANK", get("RANK")?)?;
        let world_size = number("WORLD_SIZE", get("WORLD_SIZE")?)?;
        let local_rank = match var("LOCAL_RANK") {
            Some(v) if !v.trim().is_empty() => number("LOCAL_RANK", v.trim().to_string())?,
            _ => 0,
        };
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True");
        let r = Rendezvous {
            master_addr,
            master_port,
            rank,
            world_size,
            local_rank,
            agent_store,
        };
        r.validate()?;
        Ok(r)
    }

    fn validate(&self) -> Result<()> {
        if self.world_size == 0 || self.world_size > i32::MAX as usize {
            bail!(
                "rendezvous: WORLD_SIZE={} must be at least 1",
                self.world_size
            );
        }
        if self.rank >= self.world_size {
            bail!(
                "rendezvous: RANK={} is not below WORLD_SIZE={}",
                self.rank,
                self.world_size
            );
        }
        if self.master_port == 0 && (self.rank != 0 || self.agent_store) {
            bail!("rendezvous: MASTER_PORT=0 only lets rank 0 host the store, the others cannot find it");
        }
        Ok(())
    }
}

/// A c10d key-value store shared by the processes: a TCPStore, or a prefixed view of one.
/// Process groups rendezvous through it.
pub struct Store {
    ptr: NonNull<c_void>,
}

// c10d's stores are thread-safe (torch.distributed shares them between threads).
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// A TCPStore at `host:port` for `world_size` processes. The server (`is_server`, rank 0
    /// unless torchrun's agent hosts it) listens on the port and waits up to `timeout` for the
    /// others; a client waits up to `timeout` for the server. A port already in use is an error.
    pub fn tcp(
        host: &str,
        port: u16,
        world_size: usize,
        is_server: bool,
        timeout: Duration,
    ) -> Result<Self> {
        let world = i32::try_from(world_size).context("world size")?;
        let h = cstring(host, "store host")?;
        let mut out = std::ptr::null_mut();
        ffi(|e, l| unsafe {
            sys::dl_c10d_tcp_store(
                h.as_ptr(),
                port,
                world,
                is_server as i32,
                1,
                millis(timeout),
                &mut out,
                e,
                l,
            )
        })
        .with_context(|| {
            format!(
                "TCPStore {} at {host}:{port} for {world_size} processes",
                if is_server { "server" } else { "client" }
            )
        })?;
        Self::wrap(out)
    }

    /// The store of a rendezvous: rank 0 hosts it unless torchrun's agent does, as
    /// torch.distributed's `env://` does.
    pub fn from_rendezvous(r: &Rendezvous, timeout: Duration) -> Result<Self> {
        r.validate()?;
        Self::tcp(
            &r.master_addr,
            r.master_port,
            r.world_size,
            r.rank == 0 && !r.agent_store,
            timeout,
        )
    }

    /// A view of this store with every key under `prefix` (c10d's PrefixStore).
    pub fn prefixed(&self, prefix: &str) -> Result<Self> {
        let p = cstring(prefix, "store prefix")?;
        let mut out = std::ptr::null_mut();
        ffi(|e, l| unsafe {
            sys::dl_c10d_prefix_store(p.as_ptr(), self.ptr.as_ptr(), &mut out, e, l)
        })
        .context("PrefixStore")?;
        Self::wrap(out)
    }

    /// Adds `delta` to the counter `key` (created at 0) and returns its new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let k = cstring(key, "store key")?;
        let mut v = 0;
        ffi(|e, l| unsafe {
            sys::dl_c10d_store_add(self.ptr.as_ptr(), k.as_ptr(), delta, &mut v, e, l)
        })
        .with_context(|| format!("store.add({key:?})"))?;
        Ok(v)
    }

    fn wrap(p: *mut c_void) -> Result<Self> {
        let ptr = NonNull::new(p).context("c10d returned no store")?;
        Ok(Store { ptr })
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        unsafe { sys::dl_c10d_store_free(self.ptr.as_ptr()) }
    }
}

/// The backends of a process group, as `init_process_group`'s `backend` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `"gloo"`: Gloo for CPU tensors and for CUDA ones (through host copies).
    Gloo,
    /// `"nccl"`: NCCL for CUDA tensors only.
    Nccl,
    /// `"cpu:gloo,cuda:nccl"`: Gloo for CPU tensors, NCCL for CUDA tensors.
    GlooNccl,
}

impl Backend {
    /// Whether CPU tensors have a backend (Gloo).
    pub fn has_cpu(self) -> bool {
        self != Backend::Nccl
    }
}

impl FromStr for Backend {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut parts: Vec<&str> = s.split(',').map(str::trim).collect();
        parts.sort_unstable();
        Ok(match parts.as_slice() {
            ["gloo"] | ["cpu:gloo"] | ["cpu:gloo", "cuda:gloo"] => Backend::Gloo,
            ["nccl"] | ["cuda:nccl"] => Backend::Nccl,
            ["cpu:gloo", "cuda:nccl"] => Backend::GlooNccl,
            _ => bail!("unknown backend {s:?} (gloo, nccl, cpu:gloo,cuda:nccl)"),
        })
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
            Backend::GlooNccl => "cpu:gloo,cuda:nccl",
        })
    }
}

/// How a process group is built.
#[derive(Clone, Debug)]
pub struct GroupOptions {
    /// Its backends (default Gloo).
    pub backend: Backend,
    /// How long the store, a collective or a wait may take before it fails (default 30 min, as
    /// torch's).
    pub timeout: Duration,
    /// The CUDA device of NCCL's communicator (default: the local rank).
    pub device: Option<usize>,
    /// The address Gloo binds to. Default: as torch, `GLOO_SOCKET_IFNAME`'s interfaces or else
    /// the address the host name resolves to.
    pub gloo_host: Option<String>,
    /// Whether each collective first checks that all ranks pass the same op, dtypes, shapes and
    /// devices (default true; one small all-gather over the CPU backend, skipped without one).
    /// Without it, a mismatch aborts the process inside gloo.
    pub check_collectives: bool,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            backend: Backend::Gloo,
            timeout: DEFAULT_TIMEOUT,
            device: None,
            gloo_host: None,
            check_collectives: true,
        }
    }
}

/// The reduction of [`ProcessGroup::all_reduce`]; the discriminant is c10d's `RedOpType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum over the ranks.
    Sum = 0,
    /// The mean over the ranks.
    Avg = 1,
    /// The product over the ranks.
    Product = 2,
    /// The minimum over the ranks.
    Min = 3,
    /// The maximum over the ranks.
    Max = 4,
}

impl ReduceOp {
    /// Every op.
    const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Avg,
        ReduceOp::Product,
        ReduceOp::Min,
        ReduceOp::Max,
    ];

    fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Product => "product",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
        }
    }
}

struct Inner {
    ptr: NonNull<c_void>,
    rank: usize,
    size: usize,
    local_rank: usize,
    backend: Backend,
    timeout: Duration,
    check: bool,
    // The group's backends keep their own references to the store; this keeps the root alive
    // for as long as the group, as torch does.
    _store: Store,
}

// c10d's ProcessGroup is thread-safe: torch.distributed calls it from any thread.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        unsafe { sys::dl_c10d_group_free(self.ptr.as_ptr()) }
    }
}

/// A c10d process group: `world_size` processes that run collectives together. Cloning it is
/// cheap and shares the group; it is freed with its last clone.
#[derive(Clone)]
pub struct ProcessGroup {
    inner: Arc<Inner>,
}

impl fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ProcessGroup({}, rank {} of {})",
            self.inner.backend, self.inner.rank, self.inner.size
        )
    }
}

/// c10d's `RedOpType::BAND`, for the check of [`ProcessGroup::agree`] only.
const BITWISE_AND: i32 = 5;

/// The length of a collective call's fingerprint (its op, argument and tensors; see
/// [`ProcessGroup::agree`]).
const PRINT_LEN: usize = 13;

/// The dtypes a fingerprint names, with torch's names for the messages.
const DTYPES: [(Kind, &str); 12] = [
    (Kind::Uint8, "uint8"),
    (Kind::Int8, "int8"),
    (Kind::Int16, "int16"),
    (Kind::Int, "int32"),
    (Kind::Int64, "int64"),
    (Kind::Half, "float16"),
    (Kind::Float, "float32"),
    (Kind::Double, "float64"),
    (Kind::Bool, "bool"),
    (Kind::BFloat16, "bfloat16"),
    (Kind::ComplexFloat, "complex64"),
    (Kind::ComplexDouble, "complex128"),
];

fn kind_code(k: Kind) -> i64 {
    DTYPES
        .iter()
        .position(|&(x, _)| x == k)
        .map_or(99, |i| i as i64)
}

fn device_code(d: Device) -> i64 {
    match d {
        Device::Cpu => -1,
        Device::Cuda(i) => i as i64,
        _ => -2,
    }
}

fn fingerprint(op: i64, arg: i64, ts: &[&Tensor]) -> Vec<i64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let describe = |t: &Tensor| (kind_code(t.kind()), device_code(t.device()), t.size());
    for t in ts {
        describe(t).hash(&mut h);
    }
    let mut p = vec![op, arg, ts.len() as i64, (h.finish() >> 1) as i64];
    let mut first = vec![-3; 9];
    if let Some(t) = ts.first() {
        let (k, d, s) = describe(t);
        first[0] = k;
        first[1] = d;
        first[2] = s.len() as i64;
        for (i, x) in s.iter().take(6).enumerate() {
            first[3 + i] = *x;
        }
    }
    p.extend(first);
    p
}

const OPS: [&str; 5] = [
    "all_reduce",
    "all_reduce_coalesced",
    "broadcast",
    "all_gather",
    "barrier",
];

fn describe_print(p: &[i64]) -> String {
    let op = OPS.get(p[0] as usize).copied().unwrap_or("?");
    let arg = match p[0] {
        0 | 1 => format!(
            "({})",
            ReduceOp::ALL
                .iter()
                .find(|o| **o as i64 == p[1])
                .map_or("?", |o| o.name())
        ),
        2 => format!(" from rank {}", p[1]),
        _ => String::new(),
    };
    if p[2] == 0 {
        return format!("{op}{arg}");
    }
    let kind = DTYPES
        .get(p[4] as usize)
        .map_or("another dtype", |&(_, name)| name);
    let dev = match p[5] {
        -1 => "cpu".to_string(),
        -2 => "another device".to_string(),
        i => format!("cuda:{i}"),
    };
    let dims: Vec<String> = p[7..7 + (p[6].clamp(0, 6) as usize)]
        .iter()
        .map(i64::to_string)
        .collect();
    let more = if p[6] > 6 { ", ..." } else { "" };
    let rest = if p[2] > 1 {
        format!(" and {} more tensors", p[2] - 1)
    } else {
        String::new()
    };
    format!(
        "{op}{arg} of a {kind} tensor [{}{more}] on {dev}{rest}",
        dims.join(", ")
    )
}

impl ProcessGroup {
    /// A group of `world_size` processes through `store`, this one being `rank`. Every process
    /// must call it with the same store address, world size and backend; it returns when all
    /// have joined, or fails after `options.timeout`. The group's keys go under the store's
    /// `default_pg/0/` as torch's default group's: a second group on the same store needs a
    /// store of its own, `store.prefixed("name")`.
    pub fn new(
        store: &Store,
        rank: usize,
        world_size: usize,
        options: &GroupOptions,
    ) -> Result<Self> {
        Self::build(store, rank, world_size, rank, options)
    }

    fn build(
        store: &Store,
        rank: usize,
        world_size: usize,
        local_rank: usize,
        o: &GroupOptions,
    ) -> Result<Self> {
        if world_size == 0 || rank >= world_size || world_size > i32::MAX as usize {
            bail!("process group: rank {rank} is not in a world of {world_size} processes");
        }
        let nccl = o.backend != Backend::Gloo;
        let device = o.device.unwrap_or(local_rank);
        if nccl {
            if !crate::dist::nccl_built() {
                bail!("process group ({}): this build of tch-detloss has no NCCL (build.rs found no nccl.h beside the CUDA headers; scripts/setup.sh installs them)", o.backend);
            }
            let n = tch::Cuda::device_count().max(0) as usize;
            if device >= n {
                bail!(
                    "process group ({}): rank {rank} needs CUDA device {device}, and {n} are visible",
                    o.backend
                );
            }
        }
        let root = store.prefixed("default_pg")?;
        let host = o
            .gloo_host
            .as_deref()
            .map(|h| cstring(h, "gloo host"))
            .transpose()?;
        let mut out = std::ptr::null_mut();
        ffi(|e, l| unsafe {
            sys::dl_c10d_group_new(
                root.ptr.as_ptr(),
                rank as i32,
                world_size as i32,
                o.backend.has_cpu() as i32,
                nccl as i32,
                device as i32,
                host.as_ref().map_or(std::ptr::null(), |h| h.as_ptr()),
                millis(o.timeout),
                &mut out,
                e,
                l,
            )
        })
        .with_context(|| format!("process group ({}): rank {rank} of {world_size}", o.backend))?;
        let ptr = NonNull::new(out).context("c10d returned no process group")?;
        Ok(ProcessGroup {
            inner: Arc::new(Inner {
                ptr,
                rank,
                size: world_size,
                local_rank,
                backend: o.backend,
                timeout: o.timeout,
                check: o.check_collectives,
                _store: root,
            }),
        })
    }

    /// The group of a rendezvous: its store (rank 0 hosts it unless torchrun's agent does), then
    /// the group.
    pub fn from_rendezvous(r: &Rendezvous, options: &GroupOptions) -> Result<Self> {
        let store = Store::from_rendezvous(r, options.timeout)?;
        Self::build(&store, r.rank, r.world_size, r.local_rank, options)
    }

    /// The group torchrun's environment describes ([`Rendezvous::from_env`]).
    pub fn from_env(options: &GroupOptions) -> Result<Self> {
        Self::from_rendezvous(&Rendezvous::from_env()?, options)
    }

    /// This process's rank in the group.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    /// The number of processes in the group.
    pub fn world_size(&self) -> usize {
        self.inner.size
    }

    /// This process's rank on its machine (the rendezvous' `LOCAL_RANK`; the rank for a group
    /// built with [`ProcessGroup::new`]).
    pub fn local_rank(&self) -> usize {
        self.inner.local_rank
    }

    /// Its backends.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    fn who(&self, what: &str) -> String {
        format!(
            "{what} on rank {} of {} ({})",
            self.inner.rank, self.inner.size, self.inner.backend
        )
    }

    fn check_tensors(&self, what: &str, ts: &[&Tensor]) -> Result<()> {
        for (i, t) in ts.iter().enumerate() {
            if !t.defined() {
                bail!("{}: tensor {i} is undefined", what);
            }
            if !t.is_contiguous() {
                bail!("{}: tensor {i} is not contiguous", what);
            }
            match t.device() {
                Device::Cpu if !self.inner.backend.has_cpu() => bail!(
                    "{}: tensor {i} is on the CPU, and an NCCL group takes CUDA tensors only (use cpu:gloo,cuda:nccl)",
                    what
                ),
                Device::Cpu | Device::Cuda(_) => {}
                d => bail!("{}: tensor {i} is on {d:?}, and c10d takes CPU and CUDA tensors", what),
            }
        }
        Ok(())
    }

    /// Checks that every rank calls the same collective on the same kinds of tensors.
    fn agree(&self, what: &str, op: i64, arg: i64, ts: &[&Tensor]) -> Result<()> {
        let i = &self.inner;
        if !i.check || i.size == 1 || !i.backend.has_cpu() {
            return Ok(());
        }
        let mine = fingerprint(op, arg, ts);
        // One all-reduce of one int64 tells every rank alike whether all agree: a 32-bit hash h
        // of the fingerprint above the bits of !h, reduced by bitwise AND, holds AND(h) above
        // !OR(h), and AND(h) == OR(h) exactly when every rank has the same h. (Gloo all-reduces
        // one element several times faster than a few.) Only on a mismatch does an all-gather
        // find out which rank differs.
        let h = {
            use std::hash::{Hash, Hasher};
            let mut s = std::collections::hash_map::DefaultHasher::new();
            mine.hash(&mut s);
            s.finish() as u32 as u64
        };
        let t = Tensor::from_slice(&[((h << 32) | (!h & 0xffff_ffff)) as i64]);
        let checking = || format!("{what} (checking that the ranks agree)");
        let w = self.start(checking(), vec![], |g, w, e, l| {
            let p = [t.as_ptr() as *mut c_void];
            unsafe { sys::dl_c10d_all_reduce(g, p.as_ptr(), 1, BITWISE_AND, 0, w, e, l) }
        })?;
        w.wait(None)?;
        let v = t.int64_value(&[0]) as u64;
        if v >> 32 == !v & 0xffff_ffff {
            return Ok(());
        }
        let input = Tensor::from_slice(&mine);
        let outs: Vec<Tensor> = (0..i.size)
            .map(|_| Tensor::zeros([PRINT_LEN as i64], (Kind::Int64, Device::Cpu)))
            .collect();
        self.raw_all_gather(&outs, &input, checking())
            .and_then(|w| w.wait(None))?;
        for (r, o) in outs.iter().enumerate() {
            let theirs = Vec::<i64>::try_from(o).unwrap_or_default();
            if theirs != mine {
                let t = if theirs.len() == PRINT_LEN {
                    describe_print(&theirs)
                } else {
                    "something unreadable".to_string()
                };
                bail!(
                    "{what}: the ranks disagree: rank {r} calls {t}, rank {} calls {}",
                    i.rank,
                    describe_print(&mine)
                );
            }
        }
        bail!("{what}: the ranks disagree (another rank's call differs from this one's)");
    }

    fn start(
        &self,
        what: String,
        outputs: Vec<Tensor>,
        f: impl FnOnce(*mut c_void, *mut *mut c_void, *mut c_char, usize) -> i32,
    ) -> Result<Work> {
        let mut w = std::ptr::null_mut();
        ffi(|e, l| f(self.inner.ptr.as_ptr(), &mut w, e, l)).with_context(|| what.clone())?;
        let ptr = NonNull::new(w).with_context(|| format!("{what}: c10d returned no work"))?;
        Ok(Work {
            ptr,
            what,
            outputs,
            timeout: self.inner.timeout,
        })
    }

    /// Reduces `tensor` over the ranks in place (`op`); every rank ends with the result. The
    /// returned [`Work`] finishes it.
    ///
    /// ```no_run
    /// # use tch::Tensor;
    /// # use tch_detloss::dist::{ProcessGroup, GroupOptions, ReduceOp};
    /// let group = ProcessGroup::from_env(&GroupOptions::default())?;
    /// let t = Tensor::from_slice(&[1.0f32, 2.0]);
    /// group.all_reduce(&t, ReduceOp::Sum)?.wait(None)?;
    /// # anyhow::Ok(())
    /// ```
    pub fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<Work> {
        let what = self.who(&format!("all_reduce({})", op.name()));
        self.check_tensors(&what, &[tensor])?;
        self.agree(&what, 0, op as i64, &[tensor])?;
        let p = ptrs([tensor]);
        self.start(what, vec![tensor.shallow_clone()], |g, w, e, l| unsafe {
            sys::dl_c10d_all_reduce(g, p.as_ptr(), 1, op as i32, 0, w, e, l)
        })
    }

    /// [`ProcessGroup::all_reduce`] of several tensors in one collective (c10d's
    /// `allreduce_coalesced`: on Gloo, tensors of one dtype and device).
    pub fn all_reduce_coalesced(&self, tensors: &[Tensor], op: ReduceOp) -> Result<Work> {
        let what = self.who(&format!("all_reduce_coalesced({})", op.name()));
        let refs: Vec<&Tensor> = tensors.iter().collect();
        if refs.is_empty() {
            bail!("{what}: no tensor");
        }
        self.check_tensors(&what, &refs)?;
        self.agree(&what, 1, op as i64, &refs)?;
        let p = ptrs(refs.iter().copied());
        let outs = tensors.iter().map(Tensor::shallow_clone).collect();
        self.start(what, outs, |g, w, e, l| unsafe {
            sys::dl_c10d_all_reduce(g, p.as_ptr(), p.len(), op as i32, 1, w, e, l)
        })
    }

    /// Copies rank `root`'s `tensor` into every rank's, in place.
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Work> {
        let what = self.who(&format!("broadcast from rank {root}"));
        if root >= self.inner.size {
            bail!("{what}: there is no rank {root}");
        }
        self.check_tensors(&what, &[tensor])?;
        self.agree(&what, 2, root as i64, &[tensor])?;
        let p = ptrs([tensor]);
        self.start(what, vec![tensor.shallow_clone()], |g, w, e, l| unsafe {
            sys::dl_c10d_broadcast(g, p.as_ptr(), 1, root as i32, w, e, l)
        })
    }

    /// Every rank's `tensor`, in rank order: [`Work::outputs`] once waited for.
    pub fn all_gather(&self, tensor: &Tensor) -> Result<Work> {
        let what = self.who("all_gather");
        self.check_tensors(&what, &[tensor])?;
        self.agree(&what, 3, 0, &[tensor])?;
        let outs: Vec<Tensor> = (0..self.inner.size).map(|_| tensor.empty_like()).collect();
        self.raw_all_gather(&outs, tensor, what)
    }

    fn raw_all_gather(&self, outs: &[Tensor], input: &Tensor, what: String) -> Result<Work> {
        let p = ptrs(outs);
        let inp = input.as_ptr() as *mut c_void;
        let keep = outs.iter().map(Tensor::shallow_clone).collect();
        self.start(what, keep, |g, w, e, l| unsafe {
            sys::dl_c10d_all_gather(g, p.as_ptr(), p.len(), inp, w, e, l)
        })
    }

    /// Returns when every rank has reached it.
    pub fn barrier(&self) -> Result<Work> {
        let what = self.who("barrier");
        self.agree(&what, 4, 0, &[])?;
        self.start(what, Vec::new(), |g, w, e, l| unsafe {
            sys::dl_c10d_barrier(g, w, e, l)
        })
    }

    /// MMDetection's `reduce_mean`: the mean of `tensor` over the ranks, in a new tensor on its
    /// device: `all_reduce(tensor / world_size, sum)`. No value is read back to the host: on CUDA
    /// with NCCL the result is ready in stream order, so `avg_factor = reduce_mean(&num_pos)`
    /// goes straight into a fused loss. Integer tensors are averaged in float32; the result is
    /// detached from autograd (the collective has no gradient).
    pub fn reduce_mean(&self, tensor: &Tensor) -> Result<Tensor> {
        if !tensor.defined() {
            bail!("{}: the tensor is undefined", self.who("reduce_mean"));
        }
        let t = tensor.detach();
        let t = if t.is_floating_point() {
            t
        } else {
            t.f_to_kind(Kind::Float)?
        };
        let mean = t.f_div_scalar(self.inner.size as f64)?.f_contiguous()?;
        self.all_reduce(&mean, ReduceOp::Sum)
            .and_then(|w| w.wait(None))
            .context("reduce_mean")?;
        Ok(mean)
    }

    pub(crate) fn raw(&self) -> *mut c_void {
        self.inner.ptr.as_ptr()
    }
}

/// A collective in flight. [`Work::wait`] ends it; dropping it without waiting lets it finish in
/// the background.
pub struct Work {
    ptr: NonNull<c_void>,
    what: String,
    outputs: Vec<Tensor>,
    timeout: Duration,
}

// c10d's Work is waited on from any thread in torch.distributed.
unsafe impl Send for Work {}

impl Work {
    /// Waits until the collective is done, for at most `timeout` (`None`: the group's timeout).
    /// A peer that left, a timeout or a backend error is an error naming the collective and the
    /// rank (gloo's message names the peer's address). On CUDA with NCCL, the current stream
    /// waits for the collective and the host does not.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<()> {
        let t = millis(timeout.unwrap_or(self.timeout));
        ffi(|e, l| unsafe { sys::dl_c10d_work_wait(self.ptr.as_ptr(), t, e, l) })
            .with_context(|| format!("{} failed", self.what))
    }

    /// The collective's result tensors: the reduced or broadcast tensors (sharing the inputs'
    /// storage), or every rank's tensor for an all-gather. Read them after [`Work::wait`].
    pub fn outputs(&self) -> &[Tensor] {
        &self.outputs
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        unsafe { sys::dl_c10d_work_free(self.ptr.as_ptr()) }
    }
}

/// Whether this build has the NCCL backend (build.rs found nccl.h and the CUDA headers).
pub fn nccl_built() -> bool {
    cfg!(dl_nccl)
}

static DEFAULT: RwLock<Option<ProcessGroup>> = RwLock::new(None);

/// Sets up the default group from torchrun's environment ([`ProcessGroup::from_env`]), as
/// torch's `init_process_group(backend)`, and returns it. An error when one is set up already.
pub fn init_process_group(options: &GroupOptions) -> Result<ProcessGroup> {
    if is_initialized() {
        bail!("init_process_group: the default process group is initialized already");
    }
    let g = ProcessGroup::from_env(options).context("init_process_group")?;
    set_default_group(g.clone())?;
    Ok(g)
}

/// Makes `group` the default group, for [`reduce_mean`], [`rank`] and [`world_size`].
pub fn set_default_group(group: ProcessGroup) -> Result<()> {
    let mut d = DEFAULT
        .write()
        .map_err(|_| anyhow!("the default group's lock is poisoned"))?;
    if d.is_some() {
        bail!("the default process group is initialized already");
    }
    *d = Some(group);
    Ok(())
}

/// Forgets the default group (freed with its last clone), as `destroy_process_group()`.
pub fn destroy_process_group() {
    if let Ok(mut d) = DEFAULT.write() {
        d.take();
    }
}

/// The default group, if one is set up.
pub fn default_group() -> Option<ProcessGroup> {
    DEFAULT.read().ok().and_then(|d| d.clone())
}

/// Whether a default group is set up.
pub fn is_initialized() -> bool {
    default_group().is_some()
}

/// This process's rank in the default group; 0 without one.
pub fn rank() -> usize {
    default_group().map_or(0, |g| g.rank())
}

/// The size of the default group; 1 without one.
pub fn world_size() -> usize {
    default_group().map_or(1, |g| g.world_size())
}

/// This process's rank on its machine: the default group's, else `LOCAL_RANK`, else 0.
pub fn local_rank() -> usize {
    default_group().map_or_else(
        || {
            std::env::var("LOCAL_RANK")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        },
        |g| g.local_rank(),
    )
}

/// MMDetection's `mmdet.utils.reduce_mean` over the default group
/// ([`ProcessGroup::reduce_mean`]); without a group, `tensor` itself, as MMDetection's.
///
/// ```
/// # use tch::Tensor;
/// // Not distributed: the count itself.
/// let avg = tch_detloss::dist::reduce_mean(&Tensor::from(12.0f32))?;
/// assert_eq!(avg.double_value(&[]), 12.0);
/// # anyhow::Ok(())
/// ```
pub fn reduce_mean(tensor: &Tensor) -> Result<Tensor> {
    match default_group() {
        Some(g) => g.reduce_mean(tensor),
        None => Ok(tensor.shallow_clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_describe_the_call() {
        let t = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu));
        let p = fingerprint(0, ReduceOp::Max as i64, &[&t]);
        assert_eq!(p.len(), PRINT_LEN);
        assert_eq!(
            describe_print(&p),
            "all_reduce(max) of a float32 tensor [3, 4] on cpu"
        );
        let u = Tensor::zeros([3], (Kind::Int64, Device::Cpu));
        assert_ne!(fingerprint(0, 4, &[&t]), fingerprint(0, 4, &[&u]));
        assert_ne!(fingerprint(1, 0, &[&t, &u]), fingerprint(1, 0, &[&t, &t]));
        assert_eq!(describe_print(&fingerprint(4, 0, &[])), "barrier");
    }

    #[test]
    fn backends_parse_as_torch_names_them() {
        assert_eq!("gloo".parse::<Backend>().unwrap(), Backend::Gloo);
        assert_eq!("nccl".parse::<Backend>().unwrap(), Backend::Nccl);
        assert_eq!(
            "cuda:nccl,cpu:gloo".parse::<Backend>().unwrap(),
            Backend::GlooNccl
        );
        assert!("mpi".parse::<Backend>().is_err());
    }
}
