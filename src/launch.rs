//! The device executor's launch plan: which entry point of `kernels/kernels.cu`, with how many
//! blocks, and the two-stage reduction (per-block partials, then a one-block finalize). The CUDA
//! device and the emulated device run the very same plan; neither knows of losses.

use tch::Kind;

use crate::abi::{DlArgs, Pass, FLAG_ROW_SUM};
use crate::bodies::Body;
use crate::Reduction;

/// Threads per block (`dl::dev::THREADS` in kernels/kernels.cu).
pub(crate) const THREADS: u32 = 256;
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
    }
}

/// The plan of one pass of `body` over the elements `args` describes.
pub(crate) fn plan(body: Body, pass: Pass, kind: Kind, args: &DlArgs, geo: Geometry) -> Plan {
    let total = args.n * args.c;
    // QFL's 'none' forward writes one value per row: one thread per row.
    let work = if args.flags & FLAG_ROW_SUM != 0
        && args.reduction == Reduction::None as i32
        && pass == Pass::Forward
    {
        args.n
    } else {
        total
    };
    let blocks = ((work + THREADS as i64 - 1) / THREADS as i64).clamp(1, geo.max_blocks.max(1));
    // 32-bit indices while the grid-stride index cannot wrap: the last index plus one stride.
    let wide = geo.force_wide || total + blocks * THREADS as i64 >= (1i64 << 32);
    let kernel = format!(
        "dl_{}_{}_{}_{}",
        body.name(),
        pass_name(pass),
        suffix(kind),
        if wide { "k64" } else { "k" }
    );
    let finalize = (pass == Pass::Forward && args.reduction != Reduction::None as i32)
        .then(|| (format!("dl_finalize_{}_k", suffix(kind)), blocks));
    Plan {
        kernel,
        blocks: blocks as u32,
        finalize,
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
                    let p = plan(body, pass, kind, &args, geo);
                    names.push(p.kernel);
                    names.extend(p.finalize.map(|(f, _)| f));
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}
