//! SVG plots of training runs (plotters' SVG backend, no font files: text is left to the viewer).

use plotters::prelude::*;

use crate::training::StepRecord;

/// The loss curve of `log` under the title `title`: loss against step, as an SVG document.
pub fn loss_svg(log: &[StepRecord], title: &str) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let last_step = log.last().map_or(1, |r| r.step).max(1);
        let (lo, hi) = log
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
                (lo.min(r.loss), hi.max(r.loss))
            });
        let (lo, hi) = if lo.is_finite() && hi > lo {
            (lo, hi)
        } else {
            (0.0, 1.0)
        };
        let pad = 0.05 * (hi - lo);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0u64..last_step, (lo - pad)..(hi + pad))
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (nats / token)")
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(LineSeries::new(log.iter().map(|r| (r.step, r.loss)), &BLUE))
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

fn plot_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the loss curve: {e}")
}
