//! The argument block and the codes shared with the kernels (kernels/common.cuh), in one place
//! on this side: what a launch passes, whichever executor runs it.

use tch::Kind;

/// The pass of a launch (`PASS_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    Forward = 0,
    Backward = 1,
    /// The histogram executor's pre-pass (per-block bin counts).
    Histogram = 2,
}

/// The shape of a kernel body (`SHAPE_*`, DESIGN.md section 9): what its functor sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    /// One element of `(N, C)` (the histogram bodies too).
    Element = 0,
    /// One row of `C` values.
    Row = 1,
    /// One box pair: the 4 coordinates of a pred and a target row (the IoU family).
    Box = 2,
}

// `FLAG_*`: how a body reads its arguments.
pub(crate) const FLAG_ACTIVATED: i32 = 1;
pub(crate) const FLAG_IOU_WEIGHTED: i32 = 2;
pub(crate) const FLAG_ROW_SUM: i32 = 4;
pub(crate) const FLAG_STRICT_LABELS: i32 = 8;
pub(crate) const FLAG_SIGMOID: i32 = 16;
pub(crate) const FLAG_SHORTCUT: i32 = 64;
pub(crate) const FLAG_PLAIN_MEAN: i32 = 128;

/// `SCAN_STATS`: the values per row in the row executors' `row_stat` buffer.
pub(crate) const SCAN_STATS: i64 = 2;

// `TARGET_*`: what `target` (and `score`) hold.
pub(crate) const TARGET_DENSE: i32 = 0;
pub(crate) const TARGET_LABELS: i32 = 1;
pub(crate) const TARGET_LABELS_SCORES: i32 = 2;
pub(crate) const TARGET_ROW_VALUE: i32 = 3;

// `AVG_*`: the divisor of 'mean' (`has_avg_factor`).
pub(crate) const AVG_VALUE: i32 = 1;
pub(crate) const AVG_TENSOR: i32 = 2;
pub(crate) const AVG_COUNT_VALID: i32 = 3;

/// `MAX_BINS`: the most histogram bins the executors take.
pub(crate) const MAX_BINS: i64 = 1024;

// `SLOT_*`: the per-block partials of a forward reduction, in slots of `n_partials` values.
/// The slots a forward reduction uses: the loss; the valid count; the short-cut's sum and count.
pub(crate) const SLOTS_WITH_COUNT: i64 = 2;
pub(crate) const SLOTS_WITH_SHORTCUT: i64 = 4;

// The reduction codes (`RED_*`) are the discriminants of `crate::Reduction`.

/// Mirrors `dl::Args` in kernels/common.cuh, checked field by field (name, offset, size) against
/// the layout the C++ compiler gives it (the test below).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DlArgs {
    pub pred: u64,
    pub target: u64,
    pub score: u64,
    pub weight: u64,
    pub avg_factor: u64,
    pub grad_out: u64,
    pub out: u64,
    pub partials: u64,
    pub grad_buf: u64,
    pub row_stat: u64,
    pub hist_counts: u64,
    pub hist_weights: u64,
    pub hist_state: u64,
    pub hist_tot: u64,
    pub aux: u64,
    pub shortcut: u64,
    pub n: i64,
    pub c: i64,
    pub w_sn: i64,
    pub w_sc: i64,
    pub g_sn: i64,
    pub g_sc: i64,
    pub i0: i64,
    pub avg_factor_value: f64,
    pub loss_weight: f64,
    pub p0: f64,
    pub p1: f64,
    pub p2: f64,
    pub p3: f64,
    pub momentum: f64,
    pub last_edge: f64,
    pub hist_replicas: f64,
    pub flags: i32,
    pub target_mode: i32,
    pub reduction: i32,
    pub has_avg_factor: i32,
    pub n_partials: i32,
    pub bins: i32,
}

/// The kernels' dtype code (`DT_*`) of a tensor kind; `None` for kinds without kernels.
pub(crate) fn dtype_code(kind: Kind) -> Option<i32> {
    match kind {
        Kind::Float => Some(0),
        Kind::Double => Some(1),
        Kind::Half => Some(2),
        Kind::BFloat16 => Some(3),
        _ => None,
    }
}

/// The NUL-terminated message a C ABI call wrote into `buf` (all of it if there is no NUL).
pub(crate) fn c_message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    /// `DlArgs` has the fields of `dl::Args` (DL_ARGS_FIELDS in kernels/common.cuh), in order,
    /// at the same offsets and with the same sizes, and nothing else.
    #[cfg(dl_emu)]
    #[test]
    fn args_layout_matches_the_kernels() {
        use super::DlArgs;
        use std::ffi::{c_char, CStr};
        use std::mem::{offset_of, size_of, size_of_val};

        #[repr(C)]
        struct ArgsField {
            name: *const c_char,
            offset: u64,
            size: u64,
        }
        extern "C" {
            fn dl_args_layout(rows: *mut *const ArgsField) -> usize;
        }
        let mut rows: *const ArgsField = std::ptr::null();
        // SAFETY: returns a static table and its length.
        let n = unsafe { dl_args_layout(&mut rows) };
        // SAFETY: `rows` points at `n` static rows whose names are static C strings.
        let cxx: Vec<(String, usize, usize)> = unsafe { std::slice::from_raw_parts(rows, n) }
            .iter()
            .map(|r| {
                let name = unsafe { CStr::from_ptr(r.name) }
                    .to_string_lossy()
                    .into_owned();
                (name, r.offset as usize, r.size as usize)
            })
            .collect();
        let a = DlArgs::default();
        macro_rules! fields {
            ($($f:ident),* $(,)?) => {
                vec![$((stringify!($f).to_string(), offset_of!(DlArgs, $f), size_of_val(&a.$f))),*]
            };
        }
        let rust = fields!(
            pred,
            target,
            score,
            weight,
            avg_factor,
            grad_out,
            out,
            partials,
            grad_buf,
            row_stat,
            hist_counts,
            hist_weights,
            hist_state,
            hist_tot,
            aux,
            shortcut,
            n,
            c,
            w_sn,
            w_sc,
            g_sn,
            g_sc,
            i0,
            avg_factor_value,
            loss_weight,
            p0,
            p1,
            p2,
            p3,
            momentum,
            last_edge,
            hist_replicas,
            flags,
            target_mode,
            reduction,
            has_avg_factor,
            n_partials,
            bins,
        );
        assert_eq!(rust, cxx, "DlArgs (Rust) against dl::Args (C++)");
        let (_, last, size) = cxx.last().cloned().unwrap_or_default();
        assert_eq!(
            size_of::<DlArgs>(),
            last + size,
            "DlArgs has trailing fields or padding"
        );
    }

    #[cfg(not(dl_emu))]
    #[test]
    fn args_layout_matches_the_kernels() {
        panic!("the layout check needs the emulated device (CUDA headers at build time)");
    }
}
