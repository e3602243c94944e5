//! A small detector: a 5-stage convolutional backbone, a 3-level FPN and MMDetection's ATSS head
//! (shared classification and regression towers with GroupNorm, the class, box and centerness
//! convolutions, a learnable scale per level), initialised as MMDetection initialises ATSSHead:
//! normal(0, 0.01) convolutions and the classification bias at prior probability 0.01.

use tch::nn;
use tch::Tensor;

/// The pyramid strides, as the anchor generator's config lists them.
pub const STRIDES: [i64; 3] = [8, 16, 32];

fn conv(
    vs: nn::Path,
    i: i64,
    o: i64,
    k: i64,
    stride: i64,
    std: Option<f64>,
    bias: f64,
) -> nn::Conv2D {
    let mut c = nn::ConvConfig {
        stride,
        padding: k / 2,
        ..Default::default()
    };
    if let Some(std) = std {
        c.ws_init = nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        c.bs_init = nn::Init::Const(bias);
    }
    nn::conv2d(vs, i, o, k, c)
}

/// Conv, GroupNorm, ReLU.
struct ConvGn {
    conv: nn::Conv2D,
    gn: nn::GroupNorm,
}

impl ConvGn {
    fn new(vs: nn::Path, i: i64, o: i64, stride: i64, std: Option<f64>) -> Self {
        let conv = conv(&vs / "conv", i, o, 3, stride, std, 0.0);
        let gn = nn::group_norm(&vs / "gn", 8, o, Default::default());
        Self { conv, gn }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        x.apply(&self.conv).apply(&self.gn).relu()
    }
}

/// The detector's raw outputs per level: class logits `(B, C, H, W)`, box deltas `(B, 4, H, W)`
/// and centerness logits `(B, 1, H, W)`.
pub struct Outputs {
    pub cls: Vec<Tensor>,
    pub reg: Vec<Tensor>,
    pub ctr: Vec<Tensor>,
}

pub struct Detector {
    stem: Vec<ConvGn>,
    lateral: Vec<nn::Conv2D>,
    smooth: Vec<nn::Conv2D>,
    cls_tower: Vec<ConvGn>,
    reg_tower: Vec<ConvGn>,
    atss_cls: nn::Conv2D,
    atss_reg: nn::Conv2D,
    atss_ctr: nn::Conv2D,
    scales: Vec<Tensor>,
}

impl Detector {
    pub fn new(vs: &nn::Path, num_classes: i64, width: i64) -> Self {
        // Strides 2, 4, 8, 16, 32; the last three feed the pyramid.
        let chans = [16, 32, 64, 96, 128];
        let mut stem = Vec::new();
        let mut prev = 3;
        for (i, &c) in chans.iter().enumerate() {
            stem.push(ConvGn::new(
                vs / "backbone" / format!("stage{i}"),
                prev,
                c,
                2,
                None,
            ));
            prev = c;
        }
        let lateral = chans[2..]
            .iter()
            .enumerate()
            .map(|(l, &c)| {
                conv(
                    vs / "fpn" / format!("lateral{l}"),
                    c,
                    width,
                    1,
                    1,
                    None,
                    0.0,
                )
            })
            .collect();
        let smooth = (0..3)
            .map(|l| {
                conv(
                    vs / "fpn" / format!("smooth{l}"),
                    width,
                    width,
                    3,
                    1,
                    None,
                    0.0,
                )
            })
            .collect();
        let head = vs / "bbox_head";
        let cls_tower = (0..2)
            .map(|i| ConvGn::new(&head / format!("cls_convs{i}"), width, width, 1, Some(0.01)))
            .collect();
        let reg_tower = (0..2)
            .map(|i| ConvGn::new(&head / format!("reg_convs{i}"), width, width, 1, Some(0.01)))
            .collect();
        // bias_init_with_prob(0.01)
        let prior = -((1.0 - 0.01f64) / 0.01).ln();
        let atss_cls = conv(
            &head / "atss_cls",
            width,
            num_classes,
            3,
            1,
            Some(0.01),
            prior,
        );
        let atss_reg = conv(&head / "atss_reg", width, 4, 3, 1, Some(0.01), 0.0);
        let atss_ctr = conv(&head / "atss_centerness", width, 1, 3, 1, Some(0.01), 0.0);
        let scales = (0..3)
            .map(|l| (&head / "scales").var(&format!("scale{l}"), &[], nn::Init::Const(1.0)))
            .collect();
        Self {
            stem,
            lateral,
            smooth,
            cls_tower,
            reg_tower,
            atss_cls,
            atss_reg,
            atss_ctr,
            scales,
        }
    }

    pub fn forward(&self, images: &Tensor) -> Outputs {
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
        let pyramid: Vec<Tensor> = lat
            .iter()
            .zip(&self.smooth)
            .map(|(p, s)| p.apply(s))
            .collect();
        let mut out = Outputs {
            cls: Vec::new(),
            reg: Vec::new(),
            ctr: Vec::new(),
        };
        for (l, p) in pyramid.iter().enumerate() {
            let c = self
                .cls_tower
                .iter()
                .fold(p.shallow_clone(), |x, m| m.forward(&x));
            let r = self
                .reg_tower
                .iter()
                .fold(p.shallow_clone(), |x, m| m.forward(&x));
            out.cls.push(c.apply(&self.atss_cls));
            out.reg.push(r.apply(&self.atss_reg) * &self.scales[l]);
            out.ctr.push(r.apply(&self.atss_ctr));
        }
        out
    }
}

/// Level outputs `(B, K, H, W)` as one `(B, Σ H W, K)` tensor in the anchors' order (levels, then
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
