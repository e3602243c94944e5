//! Small PNG charts (line charts with a legend and labelled axes) drawn with embedded-graphics'
//! primitives and bitmap fonts into an RGB buffer and written by the `png` crate: no system
//! fonts or libraries needed.

// Shared by the training example and the profile command, each of which uses part of it.
#![allow(dead_code)]

use std::convert::Infallible;
use std::path::Path;

use anyhow::{Context, Result};
use embedded_graphics::mono_font::ascii::{FONT_6X10, FONT_7X13_BOLD};
use embedded_graphics::mono_font::MonoTextStyle;
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{Line, PrimitiveStyle, Rectangle};
use embedded_graphics::text::{Alignment, Text};

/// An RGB image that embedded-graphics draws into.
pub struct Canvas {
    w: u32,
    h: u32,
    px: Vec<u8>,
}

impl Canvas {
    pub fn new(w: u32, h: u32) -> Self {
        Self {
            w,
            h,
            px: vec![255; (w * h * 3) as usize],
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), self.w, self.h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&self.px)?;
        Ok(())
    }
}

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(self.w, self.h)
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = Infallible;
    fn draw_iter<I: IntoIterator<Item = Pixel<Rgb888>>>(
        &mut self,
        pixels: I,
    ) -> Result<(), Infallible> {
        for Pixel(p, c) in pixels {
            if p.x >= 0 && p.y >= 0 && (p.x as u32) < self.w && (p.y as u32) < self.h {
                let i = ((p.y as u32 * self.w + p.x as u32) * 3) as usize;
                self.px[i..i + 3].copy_from_slice(&[c.r(), c.g(), c.b()]);
            }
        }
        Ok(())
    }
}

/// Colours that stay apart in print: blue, orange, green, red, purple.
pub const PALETTE: [Rgb888; 5] = [
    Rgb888::new(31, 119, 180),
    Rgb888::new(255, 127, 14),
    Rgb888::new(44, 160, 44),
    Rgb888::new(214, 39, 40),
    Rgb888::new(148, 103, 189),
];

/// One line of a chart.
pub struct Series {
    pub name: String,
    pub color: Rgb888,
    pub points: Vec<(f64, f64)>,
}

/// A line chart: a title, axis labels and series, autoscaled (y from 0 unless `log_y`).
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub log_y: bool,
}

/// Round tick steps: 1, 2 or 5 times a power of ten, about `n` ticks over `span`.
fn tick_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.fract() == 0.0 && v.abs() < 1e7 {
        format!("{v:.0}")
    } else if v.abs() >= 1e7 || v.abs() < 0.01 {
        format!("{v:.0e}")
    } else {
        format!("{v:.2}").trim_end_matches('0').to_string()
    }
}

impl LineChart {
    /// Draws the chart into a `w` × `h` PNG at `path`.
    pub fn save(&self, path: &Path, w: u32, h: u32) -> Result<()> {
        let mut c = Canvas::new(w, h);
        let black = Rgb888::BLACK;
        let gray = Rgb888::new(220, 220, 220);
        let font = MonoTextStyle::new(&FONT_6X10, black);
        let title = MonoTextStyle::new(&FONT_7X13_BOLD, black);
        let (l, r, t, b) = (64i32, w as i32 - 16, 36i32, h as i32 - 44);
        let ty = |v: f64| if self.log_y { v.max(1e-12).log10() } else { v };
        let pts = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|p| p.0.is_finite() && p.1.is_finite());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for (x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(ty(y));
            y1 = y1.max(ty(y));
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if !self.log_y {
            y0 = y0.min(0.0);
        }
        if x1 == x0 {
            x1 = x0 + 1.0;
        }
        if y1 == y0 {
            y1 = y0 + 1.0;
        }
        y1 += (y1 - y0) * 0.05;
        let px = |x: f64| l + ((x - x0) / (x1 - x0) * f64::from(r - l)).round() as i32;
        let py = |y: f64| b - ((ty(y) - y0) / (y1 - y0) * f64::from(b - t)).round() as i32;
        let _ = Text::with_alignment(
            &self.title,
            Point::new(w as i32 / 2, 20),
            title,
            Alignment::Center,
        )
        .draw(&mut c);
        // Grid and ticks.
        let ys = tick_step(y1 - y0, 6.0);
        let mut v = (y0 / ys).ceil() * ys;
        while v <= y1 {
            let yy = b - ((v - y0) / (y1 - y0) * f64::from(b - t)).round() as i32;
            let _ = Line::new(Point::new(l, yy), Point::new(r, yy))
                .into_styled(PrimitiveStyle::with_stroke(gray, 1))
                .draw(&mut c);
            let label = if self.log_y {
                fmt_tick(10f64.powf(v))
            } else {
                fmt_tick(v)
            };
            let _ = Text::with_alignment(&label, Point::new(l - 4, yy + 3), font, Alignment::Right)
                .draw(&mut c);
            v += ys;
        }
        let xs = tick_step(x1 - x0, 8.0);
        let mut v = (x0 / xs).ceil() * xs;
        while v <= x1 {
            let xx = px(v);
            let _ = Line::new(Point::new(xx, t), Point::new(xx, b))
                .into_styled(PrimitiveStyle::with_stroke(gray, 1))
                .draw(&mut c);
            let _ = Text::with_alignment(
                &fmt_tick(v),
                Point::new(xx, b + 14),
                font,
                Alignment::Center,
            )
            .draw(&mut c);
            v += xs;
        }
        let _ = Rectangle::with_corners(Point::new(l, t), Point::new(r, b))
            .into_styled(PrimitiveStyle::with_stroke(black, 1))
            .draw(&mut c);
        let _ = Text::with_alignment(
            &self.x_label,
            Point::new((l + r) / 2, h as i32 - 8),
            font,
            Alignment::Center,
        )
        .draw(&mut c);
        let _ = Text::new(&self.y_label, Point::new(4, t - 8), font).draw(&mut c);
        for s in &self.series {
            let style = PrimitiveStyle::with_stroke(s.color, 2);
            for w2 in s.points.windows(2) {
                let (a, z) = (w2[0], w2[1]);
                if a.1.is_finite() && z.1.is_finite() {
                    let _ = Line::new(Point::new(px(a.0), py(a.1)), Point::new(px(z.0), py(z.1)))
                        .into_styled(style)
                        .draw(&mut c);
                }
            }
        }
        // Legend, top right.
        for (i, s) in self.series.iter().enumerate() {
            let y = t + 14 + 14 * i as i32;
            let _ = Line::new(Point::new(r - 190, y - 3), Point::new(r - 170, y - 3))
                .into_styled(PrimitiveStyle::with_stroke(s.color, 3))
                .draw(&mut c);
            let _ = Text::new(&s.name, Point::new(r - 165, y), font).draw(&mut c);
        }
        c.save(path)
    }
}

/// One group of horizontal bars: a label on the left, one bar per series, a note on the right.
pub struct BarGroup {
    pub label: String,
    pub values: Vec<f64>,
    pub note: String,
}

/// Horizontal grouped bars on a log scale (times that span orders of magnitude).
pub struct BarChart {
    pub title: String,
    /// Name and colour of each series, in the order of a group's values.
    pub series: Vec<(String, Rgb888)>,
    pub groups: Vec<BarGroup>,
    pub unit: String,
}

impl BarChart {
    /// Draws the chart into a PNG at `path`, 900 pixels wide and as tall as the groups need.
    pub fn save(&self, path: &Path) -> Result<()> {
        let black = Rgb888::BLACK;
        let gray = Rgb888::new(220, 220, 220);
        let font = MonoTextStyle::new(&FONT_6X10, black);
        let title = MonoTextStyle::new(&FONT_7X13_BOLD, black);
        let nbars = self.series.len().max(1) as i32;
        let (bar_h, gap) = (8i32, 6i32);
        let group_h = nbars * bar_h + gap;
        let longest = self.groups.iter().map(|g| g.label.len()).max().unwrap_or(0) as i32;
        let (w, top) = (900i32, 48i32);
        let left = (longest * 6 + 12).clamp(80, 420);
        let right = w - 70;
        let h = top + group_h * self.groups.len() as i32 + 40;
        let mut c = Canvas::new(w as u32, h as u32);
        let positive = self
            .groups
            .iter()
            .flat_map(|g| g.values.iter().copied())
            .filter(|v| *v > 0.0 && v.is_finite());
        let (lo, hi) = positive.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
        let (lo, hi) = if lo > hi {
            (1.0, 10.0)
        } else {
            (
                10f64.powf(lo.log10().floor()),
                10f64.powf(hi.log10().ceil().max(lo.log10().floor() + 1.0)),
            )
        };
        let px = |v: f64| {
            left + ((v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10())
                * f64::from(right - left))
            .round() as i32
        };
        let _ = Text::with_alignment(&self.title, Point::new(w / 2, 18), title, Alignment::Center)
            .draw(&mut c);
        // Decades, with 2 and 5 between them.
        let mut decade = lo;
        while decade <= hi * 1.0001 {
            for (m, labelled) in [(1.0, true), (2.0, false), (5.0, false)] {
                let v = decade * m;
                if v > hi * 1.0001 {
                    break;
                }
                let x = px(v);
                let _ = Line::new(Point::new(x, top - 4), Point::new(x, h - 36))
                    .into_styled(PrimitiveStyle::with_stroke(gray, 1))
                    .draw(&mut c);
                if labelled || hi / lo <= 100.0 {
                    let _ = Text::with_alignment(
                        &fmt_tick(v),
                        Point::new(x, h - 24),
                        font,
                        Alignment::Center,
                    )
                    .draw(&mut c);
                }
            }
            decade *= 10.0;
        }
        let _ = Text::with_alignment(
            &self.unit,
            Point::new((left + right) / 2, h - 8),
            font,
            Alignment::Center,
        )
        .draw(&mut c);
        for (i, g) in self.groups.iter().enumerate() {
            let y0 = top + group_h * i as i32;
            let _ = Text::with_alignment(
                &g.label,
                Point::new(left - 6, y0 + nbars * bar_h / 2 + 3),
                font,
                Alignment::Right,
            )
            .draw(&mut c);
            let mut end = left;
            for (k, v) in g.values.iter().enumerate() {
                let color = self.series.get(k).map_or(black, |s| s.1);
                if !v.is_finite() {
                    continue; // no figure for this series
                }
                let x = px(*v).max(left + 1);
                end = end.max(x);
                let _ = Rectangle::with_corners(
                    Point::new(left, y0 + k as i32 * bar_h),
                    Point::new(x, y0 + (k as i32 + 1) * bar_h - 2),
                )
                .into_styled(PrimitiveStyle::with_fill(color))
                .draw(&mut c);
            }
            let _ = Text::new(
                &g.note,
                Point::new(end + 4, y0 + nbars * bar_h / 2 + 3),
                font,
            )
            .draw(&mut c);
        }
        let _ = Line::new(Point::new(left, top - 4), Point::new(left, h - 36))
            .into_styled(PrimitiveStyle::with_stroke(black, 1))
            .draw(&mut c);
        for (k, (name, color)) in self.series.iter().enumerate() {
            let x = right - 120 + 70 * k as i32 - 70 * (self.series.len() as i32 - 2).max(0);
            let _ = Rectangle::with_corners(Point::new(x, 28), Point::new(x + 12, 36))
                .into_styled(PrimitiveStyle::with_fill(*color))
                .draw(&mut c);
            let _ = Text::new(name, Point::new(x + 16, 36), font).draw(&mut c);
        }
        c.save(path)
    }
}
