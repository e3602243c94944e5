//! The detector's shared body, a 5-stage convolutional backbone and a 3-level FPN, and the layers
//! the heads build from (`heads/`): convolutions initialised as MMDetection's `normal_init`,
//! ConvModule-like conv + norm + activation blocks, the learnable per-level `Scale`, and the
//! flattening of level outputs into MMDetection's prior order.

use tch::nn::{self, Module};
use tch::Tensor;

/// The pyramid strides, as the prior generators' configs list them.
pub const STRIDES: [i64; 3] = [8, 16, 32];

/// The FPN's (and every head's) channel width.
pub const WIDTH: i64 = 64;

/// `bias_init_with_prob(0.01)`: the classification bias at prior probability 0.01.
pub fn prior_bias() -> f64 {
    -((1.0 - 0.01f64) / 0.01).ln()
}

/// A `k`×`k` convolution with "same" padding; `std` gives `normal_init(std, bias)`, `None`
/// libtorch's default initialisation (the backbone and FPN).
pub fn conv(vs: nn::Path, i: i64, o: i64, k: i64, std: Option<f64>, bias: f64) -> nn::Conv2D {
    conv_strided(vs, i, o, k, 1, std, Some(bias))
}

/// The same without a bias, as ConvModule builds a convolution that a norm follows.
pub fn conv_no_bias(
    vs: nn::Path,
    i: i64,
    o: i64,
    k: i64,
    stride: i64,
    std: Option<f64>,
) -> nn::Conv2D {
    conv_strided(vs, i, o, k, stride, std, None)
}

fn conv_strided(
    vs: nn::Path,
    i: i64,
    o: i64,
    k: i64,
    stride: i64,
    std: Option<f64>,
    bias: Option<f64>,
) -> nn::Conv2D {
    let mut c = nn::ConvConfig {
        stride,
        padding: k / 2,
        bias: bias.is_some(),
        ..Default::default()
    };
    if let Some(std) = std {
        c.ws_init = nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        c.bs_init = nn::Init::Const(bias.unwrap_or(0.0));
    }
    nn::conv2d(vs, i, o, k, c)
}

/// ConvModule with GroupNorm (8 groups) and ReLU, as the FCOS, ATSS, GFL and TOOD heads use it
/// (`norm_cfg=dict(type='GN', ...)`; the conv has no bias under a norm).
pub struct ConvGn {
    conv: nn::Conv2D,
    gn: nn::GroupNorm,
}

impl ConvGn {
    /// A `k`×`k` block, `normal_init(std)` of the convolution when `std` is given.
    pub fn new(vs: nn::Path, i: i64, o: i64, k: i64, stride: i64, std: Option<f64>) -> Self {
        let conv = conv_no_bias(&vs / "conv", i, o, k, stride, std);
        let gn = nn::group_norm(&vs / "gn", 8, o, Default::default());
        Self { conv, gn }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.apply(&self.conv).apply(&self.gn).relu()
    }
    /// The block with another convolution in place of its own (TaskDecomposition computes the
    /// convolution itself, then this block's norm and activation).
    pub fn norm_act(&self, x: &Tensor) -> Tensor {
        x.apply(&self.gn).relu()
    }
    /// The convolution's weight `(O, I, k, k)`.
    pub fn weight(&self) -> &Tensor {
        &self.conv.ws
    }
}

/// `Scale`: one learnable factor, initialised at 1.
pub fn scales(vs: nn::Path, n: usize) -> Vec<Tensor> {
    (0..n)
        .map(|l| vs.var(&format!("scale{l}"), &[], nn::Init::Const(1.0)))
        .collect()
}

/// The backbone (strides 2 to 32) and the FPN over its last three stages: `(B, WIDTH, H/s, W/s)`
/// for s in [`STRIDES`].
pub struct Body {
    stem: Vec<ConvGn>,
    lateral: Vec<nn::Conv2D>,
    smooth: Vec<nn::Conv2D>,
}

impl Body {
    pub fn new(vs: &nn::Path) -> Self {
        let chans = [16, 32, 64, 96, 128];
        let mut stem = Vec::new();
        let mut prev = 3;
        for (i, &c) in chans.iter().enumerate() {
            stem.push(ConvGn::new(
                vs / "backbone" / format!("stage{i}"),
                prev,
                c,
                3,
                2,
                None,
            ));
            prev = c;
        }
        let fpn = vs / "fpn";
        let lateral = chans[2..]
            .iter()
            .enumerate()
            .map(|(l, &c)| conv(&fpn / format!("lateral{l}"), c, WIDTH, 1, None, 0.0))
            .collect();
        let smooth = (0..3)
            .map(|l| conv(&fpn / format!("smooth{l}"), WIDTH, WIDTH, 3, None, 0.0))
            .collect();
        Self {
            stem,
            lateral,
            smooth,
        }
    }

    pub fn forward(&self, images: &Tensor) -> Vec<Tensor> {
        let mut x = images.shallow_clone();
        let mut feats = Vec::new();
        for (i, s) in self.stem.iter().enumerate() {
            x = s.forward(&x);
            if i >= 2 {
                feats.push(x.shallow_clone());
            }
        }
        // Top-down: each level adds the upsampled coarser one.
        let mut lat: Vec<Tensor> = feats
            .iter()
            .zip(&self.lateral)
            .map(|(f, l)| f.apply(l))
            .collect();
        for l in (0..lat.len() - 1).rev() {
            let size = lat[l].size();
            let up = lat[l + 1].upsample_nearest2d([size[2], size[3]], None, None);
            lat[l] = &lat[l] + up;
        }
        lat.iter()
            .zip(&self.smooth)
            .map(|(p, s)| p.apply(s))
            .collect()
    }
}

/// ConvModule with BatchNorm and SiLU, as RTMDet's head builds it (`norm_cfg=dict(type='BN')`,
/// `act_cfg=dict(type='SiLU')`); the convolution is passed in, so that levels can share it.
pub struct BnSilu {
    bn: nn::BatchNorm,
}

impl BnSilu {
    pub fn new(vs: nn::Path, c: i64) -> Self {
        Self {
            bn: nn::batch_norm2d(vs, c, Default::default()),
        }
    }
    pub fn forward_t(&self, conv: &nn::Conv2D, x: &Tensor, train: bool) -> Tensor {
        conv.forward(x).apply_t(&self.bn, train).silu()
    }
}

/// Level outputs `(B, K, H, W)` as one `(B, Σ H W, K)` tensor in the priors' order (levels, then
/// rows, then columns): MMDetection's `permute(0, 2, 3, 1).reshape(B, -1, K)` per level.
pub fn flatten_levels(levels: &[Tensor]) -> Tensor {
    let flat: Vec<Tensor> = levels
        .iter()
        .map(|t| {
            let k = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([t.size()[0], -1, k])
        })
        .collect();
    Tensor::cat(&flat, 1)
}

/// The whole detector: the body and one head.
pub struct Detector {
    pub body: Body,
    pub head: Box<dyn crate::heads::Head>,
}

impl Detector {
    /// The head's raw outputs for `images` (`train` selects batch statistics in BatchNorm).
    pub fn forward_t(&self, images: &Tensor, train: bool) -> crate::heads::Outputs {
        self.head.forward_t(&self.body.forward(images), train)
    }
}
