//! A detection dataset that needs no download: images of procedurally drawn shapes with exact
//! boxes, deterministic from a seed.
//!
//! Three classes, each a shape with its own colour family: rectangles (reddish), ellipses
//! (greenish) and triangles (bluish), 1 to 5 per image, 14 to 60 pixels across, over a noisy
//! background. A box is the extent of the shape's painted pixels, so it is exact; shapes barely
//! overlap, so no box is hidden.

use tch::{Device, Kind, Tensor};

/// The classes, in label order.
pub const CLASSES: [&str; 3] = ["rectangle", "ellipse", "triangle"];

/// One image and its objects.
pub struct Sample {
    /// `(3, S, S)` float32 in [0, 1].
    pub image: Tensor,
    /// `(G, 4)` float32 xyxy boxes.
    pub boxes: Tensor,
    /// `(G,)` int64 labels.
    pub labels: Tensor,
}

/// SplitMix64: a small, well-mixed generator, so that the data does not depend on libtorch's.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
}

/// Image `index` of the dataset `seed` (any index: the dataset is infinite), `size` pixels square.
pub fn sample(seed: u64, index: u64, size: i64) -> Sample {
    let mut rng = Rng::new(seed.wrapping_mul(0x1000_0000_01B3) ^ index.wrapping_mul(0x9E37_79B9));
    let s = size as f64;
    let opts = (Kind::Float, Device::Cpu);
    // Background: a gray level with a gentle gradient and pixel noise, all from `rng`.
    let base = rng.range(0.25, 0.6);
    let ys = Tensor::arange(size, opts)
        .view([size, 1])
        .expand([size, size], false);
    let xs = Tensor::arange(size, opts)
        .view([1, size])
        .expand([size, size], false);
    let grad = (&xs * rng.range(-0.15, 0.15) + &ys * rng.range(-0.15, 0.15)) / s;
    let mut noise_seed = rng.next_u64();
    let mut noise = || {
        // Cheap deterministic pixel noise: a hash of the coordinates and a per-image key.
        noise_seed = noise_seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let k = (noise_seed % 1000) as f64;
        ((&xs * 12.9898 + &ys * 78.233 + k).sin() * 43758.5453).frac() * 0.08 - 0.04
    };
    let mut channels: Vec<Tensor> = (0..3).map(|_| (&grad + base) + noise()).collect();
    let n = 1 + rng.below(5);
    let mut boxes: Vec<[f64; 4]> = Vec::new();
    let mut labels = Vec::new();
    let mut tries = 0;
    while (boxes.len() as u64) < n && tries < 50 {
        tries += 1;
        let class = rng.below(3) as usize;
        let w = rng.range(14.0, 60.0).round();
        let h = (w * rng.range(0.6, 1.6)).clamp(14.0, 60.0).round();
        let x0 = rng.range(1.0, s - w - 1.0).floor();
        let y0 = rng.range(1.0, s - h - 1.0).floor();
        let candidate = [x0, y0, x0 + w, y0 + h];
        if boxes.iter().any(|b| iou(*b, candidate) > 0.05) {
            continue;
        }
        // Pixel centres inside the shape; pixel (x, y) covers [x, x + 1) × [y, y + 1).
        let (cx, cy) = (&xs + 0.5, &ys + 0.5);
        let inside_box = cx
            .ge(x0)
            .logical_and(&cx.lt(x0 + w))
            .logical_and(&cy.ge(y0))
            .logical_and(&cy.lt(y0 + h));
        let mask = match class {
            0 => inside_box,
            1 => {
                let u = (&cx - (x0 + w / 2.0)) / (w / 2.0);
                let v = (&cy - (y0 + h / 2.0)) / (h / 2.0);
                (&u * &u + &v * &v).le(1.0)
            }
            _ => {
                // Apex at the top centre, base along the bottom edge.
                let t = (&cy - y0) / h; // 0 at the apex, 1 at the base
                let half = t * (w / 2.0);
                let dx = (&cx - (x0 + w / 2.0)).abs();
                inside_box.logical_and(&dx.le_tensor(&half))
            }
        };
        let painted = mask.to_kind(Kind::Int64);
        if painted.sum(Kind::Int64).int64_value(&[]) < 20 {
            continue;
        }
        // The exact box: the extent of the painted pixels.
        let cols = painted.amax([0i64].as_slice(), false).nonzero();
        let rows = painted.amax([1i64].as_slice(), false).nonzero();
        let bx = [
            cols.min().int64_value(&[]) as f64,
            rows.min().int64_value(&[]) as f64,
            cols.max().int64_value(&[]) as f64 + 1.0,
            rows.max().int64_value(&[]) as f64 + 1.0,
        ];
        let hue = [[0.85, 0.25, 0.2], [0.25, 0.8, 0.3], [0.25, 0.35, 0.9]][class];
        let mf = mask.to_kind(Kind::Float);
        for (c, ch) in channels.iter_mut().enumerate() {
            let value = (hue[c] + rng.range(-0.15, 0.15)).clamp(0.0, 1.0);
            *ch = &*ch * (1.0 - &mf) + &mf * value + &mf * noise() * 0.5;
        }
        boxes.push(bx);
        labels.push(class as i64);
    }
    let image = Tensor::stack(&channels, 0).clamp(0.0, 1.0);
    let flat: Vec<f32> = boxes
        .iter()
        .flat_map(|b| b.iter().map(|&v| v as f32))
        .collect();
    Sample {
        image,
        boxes: Tensor::from_slice(&flat).view([-1, 4]),
        labels: Tensor::from_slice(&labels),
    }
}

/// Images `first .. first + n` of the dataset `seed`, their pixels stacked `(n, 3, S, S)` on
/// `device`.
pub fn samples(seed: u64, first: u64, n: i64, size: i64, device: Device) -> (Vec<Sample>, Tensor) {
    let samples: Vec<Sample> = (0..n as u64)
        .map(|i| sample(seed, first + i, size))
        .collect();
    let images = Tensor::stack(
        &samples
            .iter()
            .map(|s| s.image.shallow_clone())
            .collect::<Vec<_>>(),
        0,
    )
    .to_device(device);
    (samples, images)
}
