//! The SVG plots: for a sweep, FLOP and cycle reduction against sparsity with the ideal
//! `1 / (1 - s)`, cycles per operation stacked per sparsity, the gap between the FLOP and the
//! cycle reduction stacked by cause, and the PE-utilisation heatmap of the slowest layer; for a
//! training run, its loss curve.
//!
//! Key design decision: `plotters` with its SVG backend only and no font features: text is
//! written as SVG `<text>` elements that the viewer renders with its own fonts, so nothing is
//! loaded from the system and the same sweep gives the same bytes.
//!
//! What this is not: a place that computes figures. Every number drawn comes from the
//! [`Sweep`] (or the [`Heatmap`]) as the CSV and JSON report it.

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::breakdown::Causes;
use crate::sweep::{Sweep, SweepPoint};
use crate::training::StepRecord;
use crate::utilisation::Heatmap;

/// Width and height of every plot, in pixels.
const SIZE: (u32, u32) = (900, 560);
/// The heatmap draws at most this many cells per side (PEs are averaged in blocks beyond).
const MAX_CELLS: u32 = 120;
const FONT: &str = "sans-serif";

/// A plot that could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("drawing {plot}: {reason}")]
pub struct PlotError {
    pub plot: &'static str,
    pub reason: String,
}

fn failed<E: std::fmt::Display>(plot: &'static str) -> impl Fn(E) -> PlotError {
    move |e| PlotError {
        plot,
        reason: e.to_string(),
    }
}

/// File names of the plots, in the order [`sweep_plots`] returns them.
pub const PLOT_FILES: [&str; 4] = [
    "reduction.svg",
    "cycles_by_op.svg",
    "gap_by_cause.svg",
    "utilisation.svg",
];

/// The four plots of a sweep as `(file name, SVG text)`; the heatmap only if there is one.
pub fn sweep_plots(
    sweep: &Sweep,
    heatmap: Option<&Heatmap>,
) -> Result<Vec<(&'static str, String)>, PlotError> {
    let mut out = vec![
        (PLOT_FILES[0], reduction_svg(sweep)?),
        (PLOT_FILES[1], cycles_by_op_svg(sweep)?),
        (PLOT_FILES[2], gap_by_cause_svg(sweep)?),
    ];
    if let Some(map) = heatmap {
        out.push((PLOT_FILES[3], heatmap_svg(map)?));
    }
    Ok(out)
}

/// The sweep's points by increasing sparsity, the dense step first.
fn by_sparsity(sweep: &Sweep) -> Vec<&SweepPoint> {
    let mut points: Vec<&SweepPoint> = std::iter::once(&sweep.dense)
        .chain(sweep.points.iter().filter(|p| p.sparsity != 0.0))
        .collect();
    points.sort_by(|a, b| a.sparsity.total_cmp(&b.sparsity));
    points
}

/// Draws into an SVG string with `draw`.
fn svg(
    plot: &'static str,
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), PlotError>,
) -> Result<String, PlotError> {
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(failed(plot))?;
        draw(&root)?;
        root.present().map_err(failed(plot))?;
    }
    Ok(text)
}

/// The loss curve of a training run, `log`, under `title`: loss against step.
pub fn loss_svg(log: &[StepRecord], title: &str) -> Result<String, PlotError> {
    const PLOT: &str = "loss.svg";
    let last_step = log.last().map_or(1, |r| r.step).max(1);
    // A step skipped by dynamic loss scaling may have a non-finite loss: not drawn.
    let finite = || log.iter().filter(|r| r.loss.is_finite());
    let (lo, hi) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
        (lo.min(r.loss), hi.max(r.loss))
    });
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo, hi)
    } else {
        (0.0, 1.0)
    };
    let pad = 0.05 * (hi - lo);
    svg(PLOT, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0u64..last_step, (lo - pad)..(hi + pad))
            .map_err(failed(PLOT))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (nats / token)")
            .draw()
            .map_err(failed(PLOT))?;
        chart
            .draw_series(LineSeries::new(finite().map(|r| (r.step, r.loss)), &BLUE))
            .map_err(failed(PLOT))?;
        Ok(())
    })
}

/// FLOP reduction, cycle reduction and the ideal `1 / (1 - s)` against sparsity.
pub fn reduction_svg(sweep: &Sweep) -> Result<String, PlotError> {
    const PLOT: &str = "reduction.svg";
    let points = by_sparsity(sweep);
    let s_max = points.last().map_or(0.0, |p| p.sparsity);
    let x_max = (s_max + 0.05).min(1.0);
    let ideal = |s: f64| 1.0 / (1.0 - s);
    let y_max = 1.1 * ideal(s_max).max(1.0);
    let flop: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.sparsity, sweep.flop_reduction(p)))
        .collect();
    let cycle: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.sparsity, sweep.cycle_reduction(p)))
        .collect();
    let curve: Vec<(f64, f64)> = (0..=100)
        .map(|i| s_max * f64::from(i) / 100.0)
        .map(|s| (s, ideal(s)))
        .collect();
    svg(PLOT, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!(
                    "FLOP and cycle reduction vs sparsity ({} fidelity)",
                    sweep.fidelity.name()
                ),
                (FONT, 22),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(failed(PLOT))?;
        chart
            .configure_mesh()
            .x_desc("sparsity (fraction of weights pruned)")
            .y_desc("reduction vs the dense step (x)")
            .axis_desc_style((FONT, 16))
            .label_style((FONT, 13))
            .draw()
            .map_err(failed(PLOT))?;
        let series = [
            ("ideal 1 / (1 - s)", curve, BLACK.mix(0.6), false),
            ("FLOP reduction", flop, BLUE.mix(1.0), true),
            ("cycle reduction", cycle, RED.mix(1.0), true),
        ];
        for (label, data, color, dots) in series {
            let style = color.stroke_width(2);
            chart
                .draw_series(LineSeries::new(data.clone(), style))
                .map_err(failed(PLOT))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            if dots {
                chart
                    .draw_series(data.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(failed(PLOT))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font((FONT, 14))
            .draw()
            .map_err(failed(PLOT))
    })
}

/// An axis tick: whole numbers from 1000 up, else three decimals without trailing zeros (so
/// float noise such as `0.30000000000000004` never shows).
fn tick(y: f64) -> String {
    if y.abs() >= 1000.0 {
        return format!("{y:.0}");
    }
    let text = format!("{y:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    match text {
        "-0" | "" => "0".to_string(),
        t => t.to_string(),
    }
}

/// Labels of the bars: one per point, `s = 0.75`.
fn bar_labels(points: &[&SweepPoint]) -> Vec<String> {
    points
        .iter()
        .map(|p| format!("s = {}", p.sparsity))
        .collect()
}

/// One stacked bar per point; `stack(point)` gives `(label, value)` segments in legend order.
struct Stacked<'a> {
    plot: &'static str,
    title: String,
    y_desc: &'static str,
    points: Vec<&'a SweepPoint>,
    names: Vec<String>,
    /// Per point, one value per name.
    values: Vec<Vec<f64>>,
    /// Per point, a marker drawn over the bar (the total the segments add up to).
    marker: Option<(&'static str, Vec<f64>)>,
}

fn stacked_svg(s: &Stacked<'_>) -> Result<String, PlotError> {
    let plot = s.plot;
    let labels = bar_labels(&s.points);
    let (mut low, mut high) = (0.0f64, 0.0f64);
    for v in &s.values {
        high = high.max(v.iter().filter(|&&x| x > 0.0).sum());
        low = low.min(v.iter().filter(|&&x| x < 0.0).sum());
    }
    if let Some((_, m)) = &s.marker {
        for &x in m {
            (low, high) = (low.min(x), high.max(x));
        }
    }
    let span = (high - low).max(f64::MIN_POSITIVE);
    let (y0, y1) = (low - 0.05 * span * f64::from(low < 0.0), high + 0.08 * span);
    let n = s.points.len();
    svg(plot, |root| {
        let (plot_area, legend_area) = root.split_horizontally(SIZE.0 - 260);
        let mut chart = ChartBuilder::on(&plot_area)
            .caption(&s.title, (FONT, 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(90)
            .build_cartesian_2d(-0.5..n as f64 - 0.5, y0..y1)
            .map_err(failed(plot))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n.max(1))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| tick(*y))
            .x_desc("sparsity")
            .y_desc(s.y_desc)
            .axis_desc_style((FONT, 16))
            .label_style((FONT, 13))
            .draw()
            .map_err(failed(plot))?;
        let mut legend: Vec<(String, RGBAColor)> = Vec::new();
        for (k, name) in s.names.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let mut rects = Vec::new();
            for (i, v) in s.values.iter().enumerate() {
                let value = v.get(k).copied().unwrap_or(0.0);
                let below: f64 = v[..k].iter().filter(|&&x| (x > 0.0) == (value > 0.0)).sum();
                let x = i as f64;
                rects.push(Rectangle::new(
                    [(x - 0.3, below), (x + 0.3, below + value)],
                    color.filled(),
                ));
            }
            chart.draw_series(rects).map_err(failed(plot))?;
            legend.push((name.clone(), color));
        }
        if let Some((_, totals)) = &s.marker {
            let marks = totals
                .iter()
                .enumerate()
                .map(|(i, &t)| Cross::new((i as f64, t), 7, BLACK.stroke_width(2)));
            chart.draw_series(marks).map_err(failed(plot))?;
        }
        draw_legend(
            &legend_area,
            plot,
            &legend,
            s.marker.as_ref().map(|(label, _)| *label),
        )
    })
}

/// The legend beside a stacked plot: one swatch per segment (the first at the top), then the
/// marker's label.
fn draw_legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    plot: &'static str,
    entries: &[(String, RGBAColor)],
    marker: Option<&str>,
) -> Result<(), PlotError> {
    let style = TextStyle::from((FONT, 14).into_font()).color(&BLACK);
    let row = |i: usize| 60 + 22 * i as i32;
    for (i, (name, color)) in entries.iter().enumerate() {
        let y = row(i);
        area.draw(&Rectangle::new([(10, y), (24, y + 14)], color.filled()))
            .map_err(failed(plot))?;
        area.draw(&Text::new(name.clone(), (32, y), style.clone()))
            .map_err(failed(plot))?;
    }
    if let Some(label) = marker {
        let y = row(entries.len());
        area.draw(&Cross::new((17, y + 7), 6, BLACK.stroke_width(2)))
            .map_err(failed(plot))?;
        area.draw(&Text::new(label.to_string(), (32, y), style))
            .map_err(failed(plot))?;
    }
    Ok(())
}

/// Cycles of each step, stacked by operation (summed over layers and phases).
pub fn cycles_by_op_svg(sweep: &Sweep) -> Result<String, PlotError> {
    let points = by_sparsity(sweep);
    let names: Vec<&'static str> = sweep.dense.cost.by_op().iter().map(|o| o.0).collect();
    let values = points
        .iter()
        .map(|p| {
            let ops = p.cost.by_op();
            names
                .iter()
                .map(|n| ops.iter().find(|o| o.0 == *n).map_or(0.0, |o| o.1 as f64))
                .collect()
        })
        .collect();
    stacked_svg(&Stacked {
        plot: "cycles_by_op.svg",
        title: format!(
            "Cycles per operation, one training step ({} fidelity)",
            sweep.fidelity.name()
        ),
        y_desc: "cycles per step",
        points,
        names: names.iter().map(|n| n.to_string()).collect(),
        values,
        marker: None,
    })
}

/// `flop_reduction - cycle_reduction` per sparse point, stacked by cause, with the measured gap
/// marked.
pub fn gap_by_cause_svg(sweep: &Sweep) -> Result<String, PlotError> {
    let points: Vec<&SweepPoint> = by_sparsity(sweep)
        .into_iter()
        .filter(|p| p.sparsity != 0.0)
        .collect();
    let values = points
        .iter()
        .map(|p| p.gap.causes_in_reduction().values().to_vec())
        .collect();
    let measured = points
        .iter()
        .map(|p| sweep.flop_reduction(p) - sweep.cycle_reduction(p))
        .collect();
    stacked_svg(&Stacked {
        plot: "gap_by_cause.svg",
        title: format!(
            "Gap between FLOP and cycle reduction, by cause ({} fidelity)",
            sweep.fidelity.name()
        ),
        y_desc: "FLOP reduction - cycle reduction (x)",
        points,
        names: Causes::LABELS.iter().map(|n| n.to_string()).collect(),
        values,
        marker: Some(("measured gap", measured)),
    })
}

/// The colour scale's range: the cells' lowest and highest utilisation rounded out to
/// twentieths, at least one twentieth wide, within `[0, 1]`.
fn scale_range(cells: &[(u32, u32, f64)]) -> (f64, f64) {
    let (min, max) = cells
        .iter()
        .fold((1.0f64, 0.0f64), |(lo, hi), c| (lo.min(c.2), hi.max(c.2)));
    let mut lo = (min * 20.0).floor() / 20.0;
    let mut hi = (max * 20.0).ceil() / 20.0;
    if hi - lo < 0.05 {
        hi = lo + 0.05;
    }
    if hi > 1.0 {
        hi = 1.0;
        lo = lo.min(0.95);
    }
    (lo.max(0.0), hi)
}

/// A colour from light (idle) to dark (always busy).
fn heat(u: f64) -> RGBColor {
    let u = u.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * u).round() as u8;
    RGBColor(lerp(255.0, 120.0), lerp(245.0, 0.0), lerp(200.0, 40.0))
}

/// The mean utilisation of the PEs in each block of `bc x br` PEs, per cell.
fn cells(map: &Heatmap, bc: u32, br: u32) -> Vec<(u32, u32, f64)> {
    let mut out = Vec::new();
    for y in 0..map.rows.div_ceil(br) {
        for x in 0..map.cols.div_ceil(bc) {
            let (mut sum, mut count) = (0.0, 0u32);
            for r in y * br..((y + 1) * br).min(map.rows) {
                for c in x * bc..((x + 1) * bc).min(map.cols) {
                    sum += map.utilisation(c, r);
                    count += 1;
                }
            }
            out.push((x, y, sum / f64::from(count.max(1))));
        }
    }
    out
}

/// Busy cycles over cycles of every PE of the region during the slowest layer's
/// weight-streamed kernels.
pub fn heatmap_svg(map: &Heatmap) -> Result<String, PlotError> {
    const PLOT: &str = "utilisation.svg";
    let (bc, br) = (
        map.cols.div_ceil(MAX_CELLS).max(1),
        map.rows.div_ceil(MAX_CELLS).max(1),
    );
    let (nx, ny) = (map.cols.div_ceil(bc), map.rows.div_ceil(br));
    let source = match map.fidelity {
        crate::runtime::Fidelity::Exact => "simulated busy cycles",
        crate::runtime::Fidelity::Fast => "per-entry tasks of the cost model",
    };
    let block = if bc * br > 1 {
        format!(", mean of {bc} x {br} PE blocks")
    } else {
        String::new()
    };
    svg(PLOT, |root| {
        let (plot_area, scale_area) = root.split_horizontally(SIZE.0 - 110);
        let mut chart = ChartBuilder::on(&plot_area)
            .caption(
                format!(
                    "PE utilisation, layer {} weight-streamed kernels, s = {} (mean {:.2})",
                    map.layer,
                    map.sparsity,
                    map.mean()
                ),
                (FONT, 20),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..f64::from(nx * bc), f64::from(ny * br)..0.0)
            .map_err(failed(PLOT))?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .x_desc(format!("PE column ({source}{block})"))
            .y_desc("PE row")
            .axis_desc_style((FONT, 16))
            .label_style((FONT, 13))
            .draw()
            .map_err(failed(PLOT))?;
        let cells = cells(map, bc, br);
        let (lo, hi) = scale_range(&cells);
        let rects = cells.into_iter().map(|(x, y, u)| {
            let (x0, y0) = (f64::from(x * bc), f64::from(y * br));
            Rectangle::new(
                [(x0, y0), (x0 + f64::from(bc), y0 + f64::from(br))],
                heat((u - lo) / (hi - lo)).filled(),
            )
        });
        chart.draw_series(rects).map_err(failed(PLOT))?;
        color_scale(&scale_area, lo, hi)
    })
}

/// The colour scale beside the heatmap, from `lo` to `hi` utilisation.
fn color_scale(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    lo: f64,
    hi: f64,
) -> Result<(), PlotError> {
    const PLOT: &str = "utilisation.svg";
    let mut chart = ChartBuilder::on(area)
        .margin_top(60)
        .margin_bottom(60)
        .margin_right(15)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..1.0, lo..hi)
        .map_err(failed(PLOT))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(6)
        .y_label_formatter(&|v| format!("{v:.2}"))
        .y_desc("busy cycles / cycles")
        .axis_desc_style((FONT, 14))
        .label_style((FONT, 12))
        .draw()
        .map_err(failed(PLOT))?;
    let steps = (0..20).map(|i| {
        let (a, b) = (f64::from(i) / 20.0, f64::from(i + 1) / 20.0);
        let at = |t: f64| lo + (hi - lo) * t;
        Rectangle::new([(0.0, at(a)), (1.0, at(b))], heat((a + b) / 2.0).filled())
    });
    chart.draw_series(steps).map_err(failed(PLOT))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_hide_float_noise() {
        assert_eq!(tick(0.30000000000000004), "0.3");
        assert_eq!(tick(-0.1), "-0.1");
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(-0.0001), "0");
        assert_eq!(tick(1.25), "1.25");
        assert_eq!(tick(450000.0), "450000");
    }

    #[test]
    fn heat_runs_from_light_to_dark() {
        assert_eq!(heat(0.0), RGBColor(255, 245, 200));
        assert_eq!(heat(1.0), RGBColor(120, 0, 40));
        assert_eq!(heat(2.0), heat(1.0));
    }

    #[test]
    fn the_scale_covers_the_cells_in_twentieths() {
        let at = |u: f64| (0, 0, u);
        assert_eq!(scale_range(&[at(0.52), at(0.61)]), (0.5, 0.65));
        assert_eq!(scale_range(&[at(0.5), at(0.5)]), (0.5, 0.55));
        assert_eq!(scale_range(&[at(0.99), at(1.0)]), (0.95, 1.0));
    }

    #[test]
    fn cells_average_blocks_of_pes() {
        // 3 x 2 PEs busy 0, 10, 20 / 30, 40, 50 of 100 cycles, in 2 x 2 blocks: the first block
        // averages 0, 10, 30, 40 -> 0.2; the second holds 20 and 50 -> 0.35.
        let map = Heatmap {
            layer: 0,
            sparsity: 0.5,
            fidelity: crate::runtime::Fidelity::Exact,
            cols: 3,
            rows: 2,
            busy: vec![0, 10, 20, 30, 40, 50],
            cycles: 100,
            runs: 1,
        };
        let got = cells(&map, 2, 2);
        assert_eq!(got.len(), 2);
        assert!((got[0].2 - 0.2).abs() < 1e-12 && (got[1].2 - 0.35).abs() < 1e-12);
    }
}
