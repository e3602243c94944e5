//! DistributedDataParallel over DDP's own `c10d::Reducer`.
use std::ffi::c_void;
use std::ptr::NonNull;

use anyhow::{bail, Context, Result};
use tch::{nn, Tensor};

use super::{ffi, ptrs, sys, ProcessGroup};

/// How [`DistributedDataParallel`] buckets and synchronises, as torch's constructor arguments.
#[derive(Clone, Debug, Default)]
pub struct DdpOptions {
    /// The bucket size in MiB (`bucket_cap_mb`); `None`: torch's default, 25 MiB, with a first
    /// bucket of 1 MiB when `find_unused_parameters`.
    pub bucket_cap_mb: Option<f64>,
    /// Whether some parameters may take no part in a step's loss (`find_unused_parameters`):
    /// the reducer then walks the autograd graph from the loss each step to find them.
    pub find_unused_parameters: bool,
    /// Whether the gradients are views into the buckets (`gradient_as_bucket_view`).
    pub gradient_as_bucket_view: bool,
    /// Whether not to copy rank 0's buffers (the variables without gradient, e.g. batch-norm
    /// statistics) to every rank before each synchronised forward pass: torch's
    /// `broadcast_buffers=False`.
    pub keep_local_buffers: bool,
}

/// DDP: gradients averaged over the ranks of a group during the backward pass, bucket by
/// bucket as they become ready, by torch's own `c10d::Reducer`.
///
/// At construction the parameters are checked to have the same shapes on every rank and
/// rank 0's parameters and buffers are copied to all. Each step is
/// [`prepare_forward`](Self::prepare_forward), the forward pass and the loss, then
/// [`backward`](Self::backward), then the optimizer step (identical on every rank).
/// [`no_sync`](Self::no_sync) accumulates gradients locally, as torch's `no_sync()`.
///
/// ```no_run
/// # use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};
/// # use tch_detloss::dist::{self, DdpOptions, DistributedDataParallel, GroupOptions};
/// let group = dist::init_process_group(&GroupOptions::default())?;
/// let vs = nn::VarStore::new(Device::Cpu);
/// let net = nn::linear(&vs.root() / "fc", 16, 1, Default::default());
/// let mut opt = nn::Sgd::default().build(&vs, 0.1)?;
/// let mut ddp = DistributedDataParallel::new(&vs, &group, &DdpOptions::default())?;
/// let micro: Vec<Tensor> = (0..4).map(|_| Tensor::randn([8, 16], (Kind::Float, Device::Cpu))).collect();
/// opt.zero_grad();
/// // Three micro-batches accumulate locally, the fourth synchronises all four.
/// for x in &micro[..3] {
///     ddp.no_sync(|d| -> anyhow::Result<()> {
///         d.prepare_forward()?;
///         d.backward(&x.apply(&net).square().mean(Kind::Float))
///     })?;
/// }
/// ddp.prepare_forward()?;
/// ddp.backward(&micro[3].apply(&net).square().mean(Kind::Float))?;
/// opt.step();
/// # anyhow::Ok(())
/// ```
pub struct DistributedDataParallel {
    ptr: NonNull<c_void>,
    group: ProcessGroup,
    buffers: Vec<Tensor>,
    find_unused: bool,
    sync_buffers: bool,
    require_sync: bool,
    prepared: bool,
    params: usize,
}

// The reducer is driven from one thread at a time (`&mut self`); its hooks run on the autograd
// engine's threads as in torch.
unsafe impl Send for DistributedDataParallel {}

/// The bucket size of DDP's parameter and buffer sync (`broadcast_bucket_size`).
const BROADCAST_BUCKET: i64 = 250 * 1024 * 1024;

impl DistributedDataParallel {
    /// DDP over a [`nn::VarStore`]'s variables: the trainable ones are the parameters, the others
    /// the buffers, both in the order of their names (the same on every rank).
    pub fn new(vs: &nn::VarStore, group: &ProcessGroup, options: &DdpOptions) -> Result<Self> {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let (params, buffers): (Vec<_>, Vec<_>) = vars
            .into_iter()
            .map(|(_, t)| t)
            .partition(Tensor::requires_grad);
        Self::from_tensors(params, buffers, group, options)
    }

    /// DDP over `params` (leaf tensors that require grad, in the same order on every rank) and
    /// `buffers`.
    pub fn from_tensors(
        params: Vec<Tensor>,
        buffers: Vec<Tensor>,
        group: &ProcessGroup,
        options: &DdpOptions,
    ) -> Result<Self> {
        let who = group.who("DistributedDataParallel");
        if params.is_empty() {
            bail!("{who}: no parameter requires grad");
        }
        for (i, p) in params.iter().enumerate() {
            if !p.defined() || !p.requires_grad() || !p.is_leaf() {
                bail!("{who}: parameter {i} is not a leaf tensor that requires grad");
            }
        }
        let devices: Vec<_> = params.iter().map(Tensor::device).collect();
        if devices.iter().any(|d| *d != devices[0]) {
            bail!("{who}: the parameters are on several devices ({devices:?})");
        }
        let default_cap = unsafe { sys::dl_c10d_default_bucket_cap() };
        let cap = match options.bucket_cap_mb {
            None => default_cap,
            Some(mb) if mb > 0.0 && mb.is_finite() => (mb * 1024.0 * 1024.0) as i64,
            Some(mb) => bail!("{who}: bucket_cap_mb {mb} must be positive"),
        };
        let p = ptrs(&params);
        let mut out = std::ptr::null_mut();
        ffi(|e, l| unsafe {
            sys::dl_c10d_reducer_new(
                group.raw(),
                p.as_ptr(),
                p.len(),
                cap,
                options.bucket_cap_mb.is_none() as i32,
                options.find_unused_parameters as i32,
                options.gradient_as_bucket_view as i32,
                &mut out,
                e,
                l,
            )
        })
        .with_context(|| format!("{who}: verifying, broadcasting and bucketing the parameters"))?;
        let ddp = DistributedDataParallel {
            ptr: NonNull::new(out).context("c10d returned no reducer")?,
            group: group.clone(),
            buffers,
            find_unused: options.find_unused_parameters,
            sync_buffers: !options.keep_local_buffers,
            require_sync: true,
            prepared: false,
            params: params.len(),
        };
        ddp.broadcast_buffers()
            .with_context(|| format!("{who}: broadcasting the buffers"))?;
        Ok(ddp)
    }

    fn broadcast_buffers(&self) -> Result<()> {
        if self.buffers.is_empty() || self.group.world_size() == 1 {
            return Ok(());
        }
        let b = ptrs(&self.buffers);
        ffi(|e, l| unsafe {
            sys::dl_c10d_broadcast_coalesced(
                self.group.raw(),
                b.as_ptr(),
                b.len(),
                BROADCAST_BUCKET,
                0,
                e,
                l,
            )
        })
    }

    /// The group the gradients are averaged over.
    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    /// The number of parameters it synchronises.
    pub fn num_parameters(&self) -> usize {
        self.params
    }

    /// Before each forward pass (DDP.forward's first half): copies rank 0's buffers and
    /// readies the reducer. Inside [`no_sync`](Self::no_sync) it does nothing.
    pub fn prepare_forward(&mut self) -> Result<()> {
        if !self.require_sync {
            return Ok(());
        }
        let who = || self.group.who("DistributedDataParallel::prepare_forward");
        if self.sync_buffers {
            self.broadcast_buffers()
                .with_context(|| format!("{}: broadcasting the buffers", who()))?;
        }
        ffi(|e, l| unsafe { sys::dl_c10d_reducer_prepare_forward(self.ptr.as_ptr(), e, l) })
            .with_context(who)?;
        self.prepared = true;
        Ok(())
    }

    /// `loss.backward()` with the gradients averaged over the ranks while it runs, bucket by
    /// bucket; they are in every parameter's `grad` when it returns. Inside
    /// [`no_sync`](Self::no_sync), a plain local backward that accumulates. A peer that fails
    /// makes it an error.
    pub fn backward(&mut self, loss: &Tensor) -> Result<()> {
        let who = self.group.who("DistributedDataParallel::backward");
        if !loss.defined() || !loss.requires_grad() {
            bail!("{who}: the loss does not require grad");
        }
        if self.require_sync {
            if !self.prepared {
                bail!("{who}: call prepare_forward before the forward pass of a synchronised step");
            }
            self.prepared = false;
            let outs = if self.find_unused {
                ptrs([loss])
            } else {
                Vec::new()
            };
            ffi(|e, l| unsafe {
                sys::dl_c10d_reducer_prepare_backward(
                    self.ptr.as_ptr(),
                    outs.as_ptr(),
                    outs.len(),
                    e,
                    l,
                )
            })
            .with_context(|| who.clone())?;
        }
        loss.f_backward()
            .map_err(anyhow::Error::from)
            .with_context(|| who.clone())
    }

    /// Runs `f` with gradient synchronisation off, as torch's `with ddp.no_sync():`: its
    /// backward passes accumulate local gradients, which the next synchronised backward averages
    /// together with its own.
    pub fn no_sync<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let before = self.require_sync;
        self.require_sync = false;
        let r = f(self);
        self.require_sync = before;
        r
    }
}

impl Drop for DistributedDataParallel {
    fn drop(&mut self) {
        unsafe { sys::dl_c10d_reducer_free(self.ptr.as_ptr()) }
    }
}
