//! The device executors' launch plan: which entry point of `kernels/kernels.cu`, with how many
//! blocks, the histogram pre-pass where a body has one, and the two-stage reduction (per-block
//! partials, then a one-block finalize). The CUDA device and the emulated device run the very
//! same plan; neither knows of losses.

use tch::Kind;

use crate::abi::{DlArgs, Pass, Shape, FLAG_ROW_SUM};
use crate::bodies::Body;
use crate::Reduction;

/// Threads per block (`dl::dev::THREADS` in kernels/kernels.cu).
pub(crate) const THREADS: u32 = 256;
/// Rows per block of the row executor: a warp per row.
const WARPS: i64 = THREADS as i64 / 32;
/// A fixed grid cap keeps the reduction order (and so the result) independent of the card.
pub(crate) const MAX_BLOCKS: i64 = 1024;

/// How the grid is shaped: the defaults, or (in tests of the executor) a smaller grid cap and
/// the 64-bit-index entry points where 32 bits would do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub max_blocks: i64,
    pub force_wide: bool,
}

impl Default for Geometry {
    fn default() -> Self {
        Self {
            max_blocks: MAX_BLOCKS,
            force_wide: false,
        }
    }
}

/// One pass as the device runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The entry point, e.g. `dl_focal_forward_f32_k`.
    pub kernel: String,
    pub blocks: u32,
    /// For reductions: the number of per-block partials (one per block of `kernel`) and the
    /// one-block kernel that adds them in order and applies the divisor and `loss_weight`.
    pub finalize: Option<(String, i64)>,
    /// For a histogram body's forward pass: the pre-pass (as many blocks as `kernel`, each
    /// writing its bin counts and a partial) and its one-block finalize, run before `kernel`.
    pub histogram: Option<(String, String)>,
}

/// The entry-point suffix of a dtype.
fn suffix(kind: Kind) -> &'static str {
    match kind {
        Kind::Double => "f64",
        Kind::Half => "f16",
        Kind::BFloat16 => "bf16",
        _ => "f32",
    }
}

fn pass_name(pass: Pass) -> &'static str {
    match pass {
        Pass::Forward => "forward",
        Pass::Backward => "backward",
        Pass::Histogram => "histogram",
    }
}

/// The plan of one pass of `body` (of `shape`) over the elements `args` describes.
pub(crate) fn plan(
    body: Body,
    shape: Shape,
    pass: Pass,
    kind: Kind,
    args: &DlArgs,
    geo: Geometry,
) -> Plan {
    let total = args.n * args.c;
    let blocks = match shape {
        // A warp per row.
        Shape::Row => (args.n + WARPS - 1) / WARPS,
        // QFL's 'none' forward writes one value per row: one thread per row.
        Shape::Element
            if args.flags & FLAG_ROW_SUM != 0
                && args.reduction == Reduction::None as i32
                && pass == Pass::Forward =>
        {
            (args.n + THREADS as i64 - 1) / THREADS as i64
        }
        Shape::Element => (total + THREADS as i64 - 1) / THREADS as i64,
        // A thread per box.
        Shape::Box => (args.n + THREADS as i64 - 1) / THREADS as i64,
    }
    .clamp(1, geo.max_blocks.max(1));
    // 32-bit indices while the grid-stride index cannot wrap: the last index plus one stride.
    let wide = geo.force_wide || total + blocks * THREADS as i64 >= (1i64 << 32);
    let entry = |pass: Pass| {
        format!(
            "dl_{}_{}_{}_{}",
            body.name(),
            pass_name(pass),
            suffix(kind),
            if wide { "k64" } else { "k" }
        )
    };
    let finalize = (pass == Pass::Forward && args.reduction != Reduction::None as i32)
        .then(|| (format!("dl_finalize_{}_k", suffix(kind)), blocks));
    let acc = if kind == Kind::Double { "f64" } else { "f32" };
    let histogram = (pass == Pass::Forward && body.histogram())
        .then(|| (entry(Pass::Histogram), format!("dl_hist_finalize_{acc}_k")));
    Plan {
        kernel: entry(pass),
        blocks: blocks as u32,
        finalize,
        histogram,
    }
}

/// Every entry point a plan can name (formed by [`plan`] itself): what the fatbin and the
/// emulated device must both have.
pub(crate) fn all_kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    let args = DlArgs {
        n: 1,
        c: 1,
        reduction: Reduction::Mean as i32,
        ..Default::default()
    };
    for body in Body::ALL {
        for pass in [Pass::Forward, Pass::Backward] {
            for kind in [Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16] {
                for force_wide in [false, true] {
                    let geo = Geometry {
                        force_wide,
                        ..Default::default()
                    };
                    let p = plan(body, Shape::Element, pass, kind, &args, geo);
                    names.push(p.kernel);
                    names.extend(p.finalize.map(|(f, _)| f));
                    names.extend(p.histogram.into_iter().flat_map(|(h, f)| [h, f]));
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}
