//! Profiling from Rust with libtorch's own tools: the Kineto profiler (a Chrome/Perfetto trace
//! and a per-op summary) and named ranges, which tch does not expose.
//!
//! ```
//! use tch::{Device, Kind, Tensor};
//! use tch_detloss::{profiler, registry, LossArgs};
//!
//! let loss = registry::build_str(r#"{"type": "FocalLoss"}"#)?;
//! let pred = Tensor::randn([256, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
//! let labels = Tensor::randint(9, [256], (Kind::Int64, Device::Cpu));
//! let trace = profiler::Trace::start(profiler::TraceConfig::cpu())?;
//! {
//!     let _step = profiler::range("my step");
//!     loss.forward(&pred, (&labels).into(), &LossArgs::new())?.backward();
//! }
//! let summary = trace.stop(Some(&std::env::temp_dir().join("focal_trace.json")))?;
//! assert!(summary.op("FocalLoss").is_some() && summary.op("my step").is_some());
//! println!("{}", summary.table(10));
//! # anyhow::Ok(())
//! ```
//!
//! Every fused loss call runs inside a range named after its loss (`FocalLoss`), and its backward
//! is the autograd node `FocalLossBackward`, so both appear in traces and summaries by name.
//! Open a trace in Perfetto (ui.perfetto.dev) or `chrome://tracing`.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CString};
use std::marker::PhantomData;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

extern "C" {
    fn dl_profiler_start(cuda: i32, shapes: i32, memory: i32, err: *mut c_char, len: usize) -> i32;
    fn dl_profiler_stop(path: *const c_char, err: *mut c_char, len: usize) -> i64;
    #[allow(clippy::too_many_arguments)]
    fn dl_profiler_event(
        i: i64,
        name: *mut c_char,
        name_len: usize,
        device_type: *mut i32,
        start_ns: *mut i64,
        duration_ns: *mut i64,
        thread: *mut u64,
        is_async: *mut i32,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn dl_range_begin(name: *const c_char) -> *mut c_void;
    fn dl_range_end(handle: *mut c_void);
}

use crate::abi::c_message as message;

/// What a trace records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceConfig {
    /// CUDA activities (kernels, copies) besides the CPU's.
    pub cuda: bool,
    /// Input shapes of each op.
    pub shapes: bool,
    /// Allocation events.
    pub memory: bool,
}

impl TraceConfig {
    /// CPU activities only.
    pub fn cpu() -> Self {
        Self {
            cuda: false,
            shapes: false,
            memory: false,
        }
    }
    /// CPU activities, and CUDA ones where a CUDA device is available.
    pub fn auto() -> Self {
        Self {
            cuda: tch::Cuda::is_available(),
            ..Self::cpu()
        }
    }
}

/// A running Kineto profiler on the current thread; [`Trace::stop`] ends it (dropping it ends it
/// too, discarding the events). Not `Send`: libtorch's profiler belongs to the thread that
/// started it.
pub struct Trace {
    running: bool,
    _thread: PhantomData<*const ()>,
}

impl Trace {
    /// Starts the profiler on this thread.
    pub fn start(config: TraceConfig) -> Result<Trace> {
        if config.cuda && !tch::Cuda::is_available() {
            bail!("profiler: CUDA activities asked for, but no CUDA device is available");
        }
        let mut err = [0u8; 512];
        // SAFETY: the buffer outlives the call and its length is passed.
        let rc = unsafe {
            dl_profiler_start(
                i32::from(config.cuda),
                i32::from(config.shapes),
                i32::from(config.memory),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc != 0 {
            bail!("profiler: cannot start: {}", message(&err));
        }
        Ok(Trace {
            running: true,
            _thread: PhantomData,
        })
    }

    /// Stops the profiler, writes the trace to `path` (a Chrome/Perfetto JSON file) when given,
    /// and summarises its events.
    pub fn stop(mut self, path: Option<&Path>) -> Result<Summary> {
        self.running = false;
        if tch::Cuda::is_available() {
            tch::Cuda::synchronize(0);
        }
        let path_c = match path {
            Some(p) => {
                Some(CString::new(p.to_string_lossy().as_bytes()).context("profiler: trace path")?)
            }
            None => None,
        };
        let mut err = [0u8; 512];
        // SAFETY: the path and the buffer outlive the call.
        let n = unsafe {
            dl_profiler_stop(
                path_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if n < 0 {
            bail!("profiler: cannot stop: {}", message(&err));
        }
        let mut events = Vec::with_capacity(n as usize);
        for i in 0..n {
            let mut name = [0u8; 256];
            let (mut dev, mut start, mut dur, mut thread, mut is_async) =
                (0i32, 0i64, 0i64, 0u64, 0i32);
            // SAFETY: every out pointer is a live local; the buffers' lengths are passed.
            let rc = unsafe {
                dl_profiler_event(
                    i,
                    name.as_mut_ptr().cast(),
                    name.len(),
                    &mut dev,
                    &mut start,
                    &mut dur,
                    &mut thread,
                    &mut is_async,
                    err.as_mut_ptr().cast(),
                    err.len(),
                )
            };
            if rc != 0 {
                return Err(anyhow!("profiler: event {i}: {}", message(&err)));
            }
            events.push(Event {
                name: message(&name),
                device: if dev == 1 { "cuda" } else { "cpu" },
                start_ns: start,
                duration_ns: dur,
                thread,
                is_async: is_async != 0,
            });
        }
        Ok(Summary::of(events))
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        if self.running {
            let mut err = [0u8; 64];
            // SAFETY: as in stop; the result is discarded.
            unsafe { dl_profiler_stop(std::ptr::null(), err.as_mut_ptr().cast(), err.len()) };
        }
    }
}

/// One profiler event.
#[derive(Clone, Debug)]
pub struct Event {
    /// The op, range or kernel name.
    pub name: String,
    /// `cpu` or `cuda`.
    pub device: &'static str,
    /// Start, in ns of the profiler's clock.
    pub start_ns: i64,
    /// Duration in ns.
    pub duration_ns: i64,
    /// The thread that started it.
    pub thread: u64,
    /// Asynchronous events do not nest.
    pub is_async: bool,
}

/// Per op (name and device): calls, total time and self time (total less the time of the events
/// nested in it on the same thread), in microseconds.
#[derive(Clone, Debug, Default)]
pub struct OpStats {
    /// The op, range or kernel name.
    pub name: String,
    /// `cpu` or `cuda`.
    pub device: &'static str,
    /// Events of this name.
    pub calls: u64,
    /// Their summed duration.
    pub total_us: f64,
    /// Their summed duration less that of the events nested in them.
    pub self_us: f64,
}

/// A stopped trace: its events and their per-op summary (largest self time first).
#[derive(Clone, Debug)]
pub struct Summary {
    /// Every event, in the profiler's order.
    pub events: Vec<Event>,
    /// Per op, largest self time first.
    pub ops: Vec<OpStats>,
}

impl Summary {
    fn of(events: Vec<Event>) -> Self {
        // Self time: CPU events nest by time on their thread; a child's time is its parent's.
        let mut order: Vec<usize> = (0..events.len()).collect();
        order.sort_by_key(|&i| (events[i].thread, events[i].start_ns, -events[i].duration_ns));
        let mut children = vec![0i64; events.len()];
        let mut stack: Vec<usize> = Vec::new();
        let mut thread = None;
        for &i in &order {
            let e = &events[i];
            if e.device != "cpu" || e.is_async {
                continue;
            }
            if thread != Some(e.thread) {
                stack.clear();
                thread = Some(e.thread);
            }
            while let Some(&top) = stack.last() {
                if events[top].start_ns + events[top].duration_ns <= e.start_ns {
                    stack.pop();
                } else {
                    break;
                }
            }
            if let Some(&parent) = stack.last() {
                children[parent] += e.duration_ns;
            }
            stack.push(i);
        }
        let mut by: BTreeMap<(String, &'static str), OpStats> = BTreeMap::new();
        for (i, e) in events.iter().enumerate() {
            let s = by
                .entry((e.name.clone(), e.device))
                .or_insert_with(|| OpStats {
                    name: e.name.clone(),
                    device: e.device,
                    ..Default::default()
                });
            s.calls += 1;
            s.total_us += e.duration_ns as f64 / 1e3;
            s.self_us += (e.duration_ns - children[i]).max(0) as f64 / 1e3;
        }
        let mut ops: Vec<OpStats> = by.into_values().collect();
        ops.sort_by(|a, b| b.self_us.total_cmp(&a.self_us));
        Summary { events, ops }
    }

    /// The summary of the op `name` (on the CPU, else on CUDA).
    pub fn op(&self, name: &str) -> Option<&OpStats> {
        let mut it = self.ops.iter().filter(|o| o.name == name);
        let first = it.next()?;
        Some(if first.device == "cpu" {
            first
        } else {
            it.find(|o| o.device == "cpu").unwrap_or(first)
        })
    }

    /// The `top` ops by self time as a table.
    pub fn table(&self, top: usize) -> String {
        let mut s = format!(
            "{:<48} {:<5} {:>7} {:>12} {:>12}\n",
            "op", "dev", "calls", "total us", "self us"
        );
        for o in self.ops.iter().take(top) {
            let name: String = o.name.chars().take(48).collect();
            s += &format!(
                "{:<48} {:<5} {:>7} {:>12.1} {:>12.1}\n",
                name, o.device, o.calls, o.total_us, o.self_us
            );
        }
        s
    }
}

/// A named range (libtorch's `record_function`) from now until the value is dropped; it costs
/// nothing measurable while no profiler runs.
pub struct Range {
    handle: *mut c_void,
}

/// Opens a range named `name` on this thread.
pub fn range(name: &str) -> Range {
    let handle = match CString::new(name) {
        // SAFETY: the name outlives the call; a null handle means "not recording".
        Ok(c) => unsafe { dl_range_begin(c.as_ptr()) },
        Err(_) => std::ptr::null_mut(),
    };
    Range { handle }
}

impl Drop for Range {
    fn drop(&mut self) {
        // SAFETY: the handle came from dl_range_begin and is ended once.
        unsafe { dl_range_end(self.handle) };
    }
}
