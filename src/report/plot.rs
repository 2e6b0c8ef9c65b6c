//! SVG line charts over thread counts, drawn with plotters' SVG backend.
//!
//! Every chart has threads on a log2 axis (ticks at powers of two), a y axis that is linear
//! from zero (ops/s), log2 (speedup) or log10 (latency), and the legend in a panel of its own
//! to the right, so labels never cover data. Text is written as SVG `<text>` in the generic
//! `sans-serif` family, for the viewer to render: no font is needed to draw the charts.

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::bench::table::thousands;

/// Chart width in pixels.
pub const WIDTH: u32 = 1000;
/// Chart height in pixels.
pub const HEIGHT: u32 = 520;
/// Width of the legend panel.
const LEGEND: u32 = 320;
/// Characters per legend line before wrapping.
const LEGEND_CHARS: usize = 40;

/// Colors (Tableau 10), chosen by index.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0x55, 0x55, 0x55),
];

/// What the y axis shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum YAxis {
    /// Ops per second, linear from zero.
    OpsPerSec,
    /// Speedup, log2.
    Speedup,
    /// Microseconds, log10.
    Micros,
}

/// How a line is stroked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stroke {
    /// Solid, with filled markers: multiq's measurements.
    Solid,
    /// Dashed, with hollow markers: peers, references, second scenarios.
    Dashed,
}

/// One line.
#[derive(Clone, Debug)]
pub struct Line {
    /// Legend text.
    pub label: String,
    /// (threads, value).
    pub points: Vec<(f64, f64)>,
    /// Index into [`PALETTE`] (or black for `None`).
    pub color: Option<usize>,
    /// Stroke.
    pub stroke: Stroke,
    /// Join the points with a line (false: markers only, for points measured at scattered
    /// thread counts, so no line suggests values between them).
    pub connect: bool,
}

/// A horizontal reference line (a device limit).
#[derive(Clone, Debug)]
pub struct Level {
    /// Value.
    pub y: f64,
    /// Legend text.
    pub label: String,
}

/// A chart.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Title.
    pub title: String,
    /// Y axis kind.
    pub y_axis: YAxis,
    /// Y axis description.
    pub y_desc: String,
    /// Lines.
    pub lines: Vec<Line>,
    /// Reference levels.
    pub levels: Vec<Level>,
    /// Extra legend lines (what is off the chart, where the data came from).
    pub notes: Vec<String>,
}

fn color(i: Option<usize>) -> RGBColor {
    i.map_or(BLACK, |i| PALETTE[i % PALETTE.len()])
}

/// Compact number: 1,250,000 → "1.25M", 403,029 → "403k", 28.4 → "28.4".
pub fn compact(v: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(format!("{:.2}", v / 1e6)))
    } else if a >= 1e4 {
        format!("{}k", trim(format!("{:.1}", v / 1e3)))
    } else if a >= 100.0 || a == 0.0 {
        thousands(v)
    } else if a >= 1.0 {
        trim(format!("{v:.1}"))
    } else {
        trim(format!("{v:.2}"))
    }
}

/// A "nice" step (1, 2 or 5 × 10^k) giving about `n` ticks over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    p * if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    }
}

/// Maps a y value into the plotting coordinate.
fn ty(axis: YAxis, v: f64) -> f64 {
    match axis {
        YAxis::OpsPerSec => v,
        YAxis::Speedup => v.max(1e-9).log2(),
        YAxis::Micros => v.max(1e-9).log10(),
    }
}

/// The y range (in plotting coordinates) and ticks (value, label) for values in `lo..=hi`.
fn y_ticks(axis: YAxis, lo: f64, hi: f64) -> ((f64, f64), Vec<(f64, String)>) {
    match axis {
        YAxis::OpsPerSec => {
            let hi = if hi > 0.0 { hi } else { 1.0 };
            let step = nice_step(hi, 6.0);
            let top = (hi * 1.08 / step).ceil() * step;
            let ticks = (0..=((top / step).round() as usize))
                .map(|i| {
                    let v = i as f64 * step;
                    (v, compact(v))
                })
                .collect();
            ((0.0, top), ticks)
        }
        YAxis::Speedup => {
            let lo = lo.clamp(1e-3, 1.0);
            let hi = hi.max(2.0);
            let (a, b) = (lo.log2().floor(), hi.log2().ceil());
            let ticks = (a as i32..=b as i32)
                .map(|k| {
                    let v = 2f64.powi(k);
                    (ty(axis, v), format!("x{}", compact(v)))
                })
                .collect();
            ((a - 0.1, b + 0.1), ticks)
        }
        YAxis::Micros => {
            let lo = lo.max(1e-3);
            let hi = hi.max(lo * 1.5);
            let (a, b) = (lo.log10().floor(), hi.log10().ceil());
            let decades = (b - a) as i32;
            let mults: &[f64] = match decades {
                0..=1 => &[1.0, 2.0, 3.0, 5.0, 7.0],
                2..=3 => &[1.0, 2.0, 5.0],
                _ => &[1.0],
            };
            let mut ticks = Vec::new();
            for k in a as i32..=b as i32 {
                for m in mults {
                    let v = m * 10f64.powi(k);
                    if v >= lo / 1.5 && v <= hi * 1.5 {
                        ticks.push((ty(axis, v), compact(v)));
                    }
                }
            }
            let (y0, y1) = (lo.log10() - 0.08, hi.log10() + 0.08);
            ticks.retain(|(t, _)| *t >= y0 && *t <= y1);
            ((y0, y1), ticks)
        }
    }
}

/// Splits `s` into lines of at most `n` characters at spaces.
fn wrap(s: &str, n: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for w in s.split_whitespace() {
        if !cur.is_empty() && cur.chars().count() + 1 + w.chars().count() > n {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(w);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Renders `chart` as an SVG document.
pub fn render(chart: &Chart) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, chart).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    // `opacity="1"` is SVG's default; ImageMagick's own renderer lets it override
    // `fill="none"` and fills every line black, so it is left out.
    Ok(svg.replace(" opacity=\"1\"", ""))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn draw(root: &Area<'_>, chart: &Chart) -> Result<(), Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
    let (plot, legend) = root.split_horizontally(WIDTH - LEGEND);
    let axis = chart.y_axis;
    let xs: Vec<f64> = chart
        .lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .filter(|x| *x > 0.0)
        .collect();
    let ys: Vec<f64> = chart
        .lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .chain(chart.levels.iter().map(|l| l.y))
        .filter(|y| y.is_finite() && (*y > 0.0 || axis == YAxis::OpsPerSec))
        .collect();
    let x_lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let x_hi = xs.iter().copied().fold(0.0, f64::max);
    let (x_lo, x_hi) = if xs.is_empty() {
        (1.0, 16.0)
    } else {
        (x_lo, x_hi)
    };
    let (xa, xb) = (
        x_lo.log2().floor(),
        x_hi.log2().ceil().max(x_lo.log2().floor() + 1.0),
    );
    let y_lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
    let y_hi = ys.iter().copied().fold(0.0, f64::max);
    let (y_lo, y_hi) = if ys.is_empty() {
        (1.0, 10.0)
    } else {
        (y_lo, y_hi)
    };
    let ((ya, yb), yticks) = y_ticks(axis, y_lo, y_hi);

    let label_font = ("sans-serif", 14).into_font().color(&BLACK);
    let tick_font = ("sans-serif", 13)
        .into_font()
        .color(&RGBColor(0x33, 0x33, 0x33));
    let mut cc = ChartBuilder::on(&plot)
        .caption(&chart.title, ("sans-serif", 18).into_font())
        .margin(12)
        .margin_top(22)
        .margin_right(24)
        .x_label_area_size(48)
        .y_label_area_size(78)
        .build_cartesian_2d((xa - 0.15)..(xb + 0.15), ya..yb)?;
    cc.configure_mesh()
        .disable_x_mesh()
        .disable_y_mesh()
        .x_labels(0)
        .y_labels(0)
        .x_desc("threads")
        .axis_desc_style(label_font.clone())
        .draw()?;
    // The y description goes above the axis, unrotated: rotated text is not drawn by every
    // converter.
    let (ax, ay) = cc.backend_coord(&(xa - 0.15, yb));
    plot.draw(&Text::new(
        chart.y_desc.clone(),
        (ax - 70, ay - 14),
        label_font
            .clone()
            .pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Left,
                plotters::style::text_anchor::VPos::Center,
            )),
    ))?;
    let grid = RGBColor(0xe4, 0xe4, 0xe4);
    // Grid and tick labels, placed by hand so the ticks are where the data is.
    for k in xa as i32..=xb as i32 {
        let x = f64::from(k);
        cc.draw_series(std::iter::once(PathElement::new(
            vec![(x, ya), (x, yb)],
            grid.stroke_width(1),
        )))?;
        let (px, py) = cc.backend_coord(&(x, ya));
        plot.draw(&Text::new(
            format!("{}", 2u64.pow(k.max(0) as u32)),
            (px, py + 6),
            tick_font
                .clone()
                .pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Top,
                )),
        ))?;
    }
    for (y, label) in &yticks {
        cc.draw_series(std::iter::once(PathElement::new(
            vec![(xa - 0.15, *y), (xb + 0.15, *y)],
            grid.stroke_width(1),
        )))?;
        let (px, py) = cc.backend_coord(&(xa - 0.15, *y));
        plot.draw(&Text::new(
            label.clone(),
            (px - 6, py),
            tick_font
                .clone()
                .pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Right,
                    plotters::style::text_anchor::VPos::Center,
                )),
        ))?;
    }
    // Reference levels.
    for level in &chart.levels {
        let y = ty(axis, level.y);
        cc.draw_series(DashedLineSeries::new(
            vec![(xa - 0.15, y), (xb + 0.15, y)],
            3,
            5,
            RGBColor(0x66, 0x66, 0x66).stroke_width(2),
        ))?;
    }
    // Lines, then markers on top.
    for line in &chart.lines {
        let c = color(line.color);
        let pts: Vec<(f64, f64)> = line
            .points
            .iter()
            .filter(|p| p.0 > 0.0 && p.1.is_finite() && (p.1 > 0.0 || axis == YAxis::OpsPerSec))
            .map(|p| (p.0.log2(), ty(axis, p.1)))
            .collect();
        match line.stroke {
            Stroke::Solid => {
                if line.connect {
                    cc.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?;
                }
                cc.draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))?;
            }
            Stroke::Dashed => {
                if line.connect {
                    cc.draw_series(DashedLineSeries::new(pts.clone(), 7, 5, c.stroke_width(2)))?;
                }
                cc.draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.stroke_width(2))))?;
            }
        }
    }
    // Legend panel.
    let legend_font = ("sans-serif", 13).into_font().color(&BLACK);
    let mut y = 44;
    let step = 17;
    let entry = |y: i32, text: &str| -> Result<i32, Box<dyn std::error::Error>> {
        let parts = wrap(text, LEGEND_CHARS);
        for (i, part) in parts.iter().enumerate() {
            legend.draw(&Text::new(
                part.clone(),
                (46, y + (i as i32) * step),
                legend_font
                    .clone()
                    .pos(plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Left,
                        plotters::style::text_anchor::VPos::Center,
                    )),
            ))?;
        }
        Ok(y + step * parts.len().max(1) as i32 + 6)
    };
    for line in &chart.lines {
        let c = color(line.color);
        match (line.stroke, line.connect) {
            (Stroke::Solid, true) => {
                legend.draw(&PathElement::new(vec![(6, y), (38, y)], c.stroke_width(2)))?;
            }
            (Stroke::Dashed, true) => {
                legend.draw(&PathElement::new(vec![(6, y), (16, y)], c.stroke_width(2)))?;
                legend.draw(&PathElement::new(vec![(28, y), (38, y)], c.stroke_width(2)))?;
            }
            (_, false) => {}
        }
        match line.stroke {
            Stroke::Solid => legend.draw(&Circle::new((22, y), 4, c.filled()))?,
            Stroke::Dashed => legend.draw(&Circle::new((22, y), 4, c.stroke_width(2)))?,
        }
        y = entry(y, &line.label)?;
    }
    for level in &chart.levels {
        let grey = RGBColor(0x66, 0x66, 0x66);
        legend.draw(&PathElement::new(
            vec![(6, y), (14, y)],
            grey.stroke_width(2),
        ))?;
        legend.draw(&PathElement::new(
            vec![(19, y), (27, y)],
            grey.stroke_width(2),
        ))?;
        legend.draw(&PathElement::new(
            vec![(32, y), (38, y)],
            grey.stroke_width(2),
        ))?;
        y = entry(y, &level.label)?;
    }
    let note_font = ("sans-serif", 12)
        .into_font()
        .color(&RGBColor(0x44, 0x44, 0x44));
    for note in &chart.notes {
        y += 4;
        for part in wrap(note, LEGEND_CHARS + 4) {
            legend.draw(&Text::new(
                part,
                (6, y),
                note_font
                    .clone()
                    .pos(plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Left,
                        plotters::style::text_anchor::VPos::Center,
                    )),
            ))?;
            y += 15;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(axis: YAxis) -> Chart {
        Chart {
            title: "light: ops/s <by> threads & more".into(),
            y_axis: axis,
            y_desc: "ops/s".into(),
            lines: vec![
                Line {
                    label: "per-thread".into(),
                    points: vec![(1.0, 100.0), (2.0, 190.0), (16.0, 210.0)],
                    color: Some(0),
                    stroke: Stroke::Solid,
                    connect: true,
                },
                Line {
                    label: "a single point, with a label long enough to wrap onto a second line"
                        .into(),
                    points: vec![(16.0, 150.0)],
                    color: Some(1),
                    stroke: Stroke::Dashed,
                    connect: false,
                },
            ],
            levels: vec![Level {
                y: 220.0,
                label: "device limit".into(),
            }],
            notes: vec!["from study.json".into()],
        }
    }

    #[test]
    fn charts_render_as_svg_with_escaped_text() {
        for axis in [YAxis::OpsPerSec, YAxis::Speedup, YAxis::Micros] {
            let svg = render(&chart(axis)).unwrap();
            assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
            assert!(svg.trim_end().ends_with("</svg>"));
            assert!(svg.contains("&lt;by&gt;") && svg.contains("&amp;"));
            assert!(svg.contains("font-family=\"sans-serif\""));
            assert!(svg.contains("\n16\n</text>"), "x ticks at powers of two");
            assert!(!svg.contains("NaN"));
        }
    }

    #[test]
    fn empty_and_degenerate_charts_still_render() {
        let mut c = chart(YAxis::OpsPerSec);
        c.lines.clear();
        c.levels.clear();
        assert!(render(&c).is_ok());
        let mut c = chart(YAxis::Micros);
        c.lines = vec![Line {
            label: "one".into(),
            points: vec![(1.0, 5.0)],
            color: None,
            stroke: Stroke::Solid,
            connect: true,
        }];
        assert!(!render(&c).unwrap().contains("NaN"));
    }

    #[test]
    fn compact_numbers() {
        assert_eq!(compact(1_250_000.0), "1.25M");
        assert_eq!(compact(403_029.0), "403k");
        assert_eq!(compact(7_000.0), "7,000");
        assert_eq!(compact(28.44), "28.4");
        assert_eq!(compact(0.5), "0.5");
        assert_eq!(compact(0.0), "0");
    }
}
