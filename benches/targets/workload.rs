//! The bench's inputs: one batch at MMDetection's training scale (RTMDet / TOOD on COCO), drawn
//! from libtorch's generator with a fixed seed.

use anyhow::Result;
use tch::{Device, Kind, Tensor};
use tch_detloss::task_modules::{AnchorGenerator, MlvlPointGenerator};

/// The batch's shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Images per batch.
    pub batch: i64,
    /// Square input side, in pixels.
    pub image: i64,
    /// Classes.
    pub classes: i64,
    /// Ground truths per image.
    pub gts: i64,
}

/// MMDetection's real scale: 8 images of 640 x 640, 80 COCO classes, 20 objects per image.
pub const SHAPE: Shape = Shape {
    batch: 8,
    image: 640,
    classes: 80,
    gts: 20,
};

/// The feature strides of both heads (P3 to P5): 80², 40² and 20² locations, 8,400 priors.
pub const STRIDES: [i64; 3] = [8, 16, 32];

/// Which prior form a head uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priors {
    /// RTMDet: `MlvlPointGenerator` with offset 0, rows `(x, y, stride_w, stride_h)`.
    Points,
    /// TOOD: `AnchorGenerator` with one anchor per location (ratio 1, `octave_base_scale` 8,
    /// one scale per octave), rows `(x1, y1, x2, y2)`.
    Anchors,
}

/// One batch, on one device.
pub struct Batch {
    /// `(N, 4)` priors, levels concatenated.
    pub priors: Tensor,
    /// `(B, N, 4)` decoded box predictions.
    pub decoded: Tensor,
    /// `(B, N, C)` class logits (what RTMDet's head hands its assigner).
    pub logits: Tensor,
    /// `(B, N, C)` their sigmoid (what TOOD's head hands its assigner).
    pub probs: Tensor,
    /// Per image `(G, 4)` xyxy ground-truth boxes.
    pub gt_bboxes: Vec<Tensor>,
    /// Per image `(G,)` int64 classes.
    pub gt_labels: Vec<Tensor>,
}

impl Batch {
    /// Priors from the crate's generators, then, for each prior, a prediction: where its centre
    /// lies inside a ground truth (the smallest one holding it), 80 % of the time that box
    /// jittered by N(0, 0.1) of its size per coordinate, with the logit of its class raised by
    /// U(2, 6); otherwise a random box around the centre (N(0, stride/2) offset, sides of 2 to 8
    /// strides). Logits are N(-4, 1) (the prior bias of a focal-style head). Ground truths: sides
    /// log-uniform in [16, 320] pixels (aspect ratio e^U(-0.7, 0.7)), placed fully inside the
    /// image, uniform classes. Drawn on the CPU, then moved to `device`.
    pub fn new(shape: Shape, priors: Priors, seed: i64, device: Device) -> Result<Batch> {
        tch::manual_seed(seed);
        let cpu = (Kind::Float, Device::Cpu);
        let sizes: Vec<(i64, i64)> = STRIDES
            .iter()
            .map(|s| (shape.image / s, shape.image / s))
            .collect();
        let strides = serde_json::json!(STRIDES);
        let prior_t = match priors {
            Priors::Points => {
                let g = MlvlPointGenerator::from_config(
                    &serde_json::json!({"type": "MlvlPointGenerator", "offset": 0, "strides": strides}),
                )?;
                Tensor::f_cat(&g.grid_priors(&sizes, Kind::Float, Device::Cpu, true)?, 0)?
            }
            Priors::Anchors => {
                let g = AnchorGenerator::from_config(&serde_json::json!({
                    "type": "AnchorGenerator", "ratios": [1.0], "octave_base_scale": 8,
                    "scales_per_octave": 1, "strides": strides}))?;
                Tensor::f_cat(&g.grid_priors(&sizes, Kind::Float, Device::Cpu)?, 0)?
            }
        };
        let n = prior_t.size()[0];
        let (b, g, c) = (shape.batch, shape.gts, shape.classes);
        // Centres and strides of the priors, (N, 2) and (N, 1).
        let (centre, stride) = match priors {
            Priors::Points => (prior_t.narrow(1, 0, 2), prior_t.narrow(1, 2, 1)),
            Priors::Anchors => {
                let c = (prior_t.narrow(1, 0, 2) + prior_t.narrow(1, 2, 2)) / 2.0;
                let level_stride: Vec<Tensor> = sizes
                    .iter()
                    .zip(STRIDES)
                    .map(|(&(h, w), s)| Tensor::full([h * w, 1], s as f64, cpu))
                    .collect();
                (c, Tensor::f_cat(&level_stride, 0)?)
            }
        };

        // Ground truths (B, G, 4).
        let side =
            |lo: f64, hi: f64| (Tensor::rand([b, g], cpu) * (hi.ln() - lo.ln()) + lo.ln()).exp();
        let w = side(16.0, 320.0);
        let h = (&w * (Tensor::rand([b, g], cpu) * 1.4 - 0.7).exp()).clamp(8.0, 600.0);
        let size = shape.image as f64;
        let x1 = Tensor::rand([b, g], cpu) * (-&w + size);
        let y1 = Tensor::rand([b, g], cpu) * (-&h + size);
        let gt = Tensor::stack(&[&x1, &y1, &(&x1 + &w), &(&y1 + &h)], -1);
        let labels = Tensor::randint(c, [b, g], (Kind::Int64, Device::Cpu));

        // The smallest ground truth holding each prior's centre (strictly), (B, N).
        let cx = centre.select(1, 0).view([1, n, 1]);
        let cy = centre.select(1, 1).view([1, n, 1]);
        let side_of = |j: i64| gt.select(2, j).unsqueeze(1);
        let inside = (&cx - side_of(0))
            .minimum(&(&cy - side_of(1)))
            .minimum(&(side_of(2) - &cx))
            .minimum(&(side_of(3) - &cy))
            .gt(0.0); // (B, N, G)
        let area = (&w * &h).unsqueeze(1).expand([b, n, g], false);
        let (best_area, which) = area
            .masked_fill(&inside.logical_not(), f64::INFINITY)
            .min_dim(2, false);
        let near_gt = best_area
            .isfinite()
            .logical_and(&Tensor::rand([b, n], cpu).lt(0.8));

        // Gt-like predictions: the holding box, jittered.
        let held = gt.gather(1, &which.unsqueeze(2).expand([b, n, 4], false), false);
        let wh = held.narrow(2, 2, 2) - held.narrow(2, 0, 2);
        let wh4 = Tensor::cat(&[&wh, &wh], 2);
        let jittered = &held + Tensor::randn([b, n, 4], cpu) * 0.1 * wh4;
        let (jx1, jy1, jx2, jy2) = (
            jittered.select(2, 0),
            jittered.select(2, 1),
            jittered.select(2, 2),
            jittered.select(2, 3),
        );
        let gt_like = Tensor::stack(
            &[
                jx1.minimum(&jx2),
                jy1.minimum(&jy2),
                jx1.maximum(&jx2),
                jy1.maximum(&jy2),
            ],
            -1,
        );
        // Random predictions around the prior.
        let st = stride.unsqueeze(0); // (1, N, 1)
        let mid = centre.unsqueeze(0) + Tensor::randn([b, n, 2], cpu) * &st * 0.5;
        let half =
            (Tensor::rand([b, n, 2], cpu) * (8f64.ln() - 2f64.ln()) + 2f64.ln()).exp() * &st / 2.0;
        let random = Tensor::cat(&[&mid - &half, &mid + &half], 2);
        let decoded = gt_like.where_self(&near_gt.unsqueeze(2), &random);

        // Logits: the prior bias, higher for the class of the box a prediction copies.
        let boost = (Tensor::rand([b, n], cpu) * 4.0 + 2.0) * near_gt.to_kind(Kind::Float);
        let near_label = labels.gather(1, &which, false);
        let logits = (Tensor::randn([b, n, c], cpu) - 4.0).scatter_add(
            2,
            &near_label.unsqueeze(2),
            &boost.unsqueeze(2),
        );

        let to = |t: &Tensor| t.to_device(device);
        Ok(Batch {
            priors: to(&prior_t),
            decoded: to(&decoded),
            probs: to(&logits.sigmoid()),
            logits: to(&logits),
            gt_bboxes: (0..b).map(|i| to(&gt.get(i))).collect(),
            gt_labels: (0..b).map(|i| to(&labels.get(i))).collect(),
        })
    }

    /// Priors in the batch.
    pub fn num_priors(&self) -> i64 {
        self.priors.size()[0]
    }
}
