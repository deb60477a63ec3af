//! The latency CDF of a run, drawn with `plotters` as SVG: time to all nodes per write and
//! per-node delivery, on a log-scaled latency axis.

use plotters::prelude::*;

/// One curve: its samples (ms, any order), its legend and colour.
#[derive(Debug)]
pub struct Series<'a> {
    /// Latencies, ms.
    pub samples: &'a [f64],
    /// Its line in the legend.
    pub label: &'a str,
    /// Line colour.
    pub color: RGBColor,
}

/// An SVG of the empirical CDFs of `series` under `title`.
pub fn cdf_svg(title: &str, series: &[Series<'_>]) -> Result<String, String> {
    let positive = series
        .iter()
        .flat_map(|s| s.samples.iter().copied())
        .filter(|v| v.is_finite() && *v > 0.0);
    let (low, high) = positive.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    // Whole decades around the samples (1 ms to 10 ms with none).
    let (low, high) = if low > high {
        (1.0, 10.0)
    } else {
        (
            10f64.powf(low.log10().floor()),
            10f64.powf(high.log10().ceil()).max(low * 10.0),
        )
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d((low..high).log_scale(), 0.0..1.0)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("latency (ms, log scale)")
            .y_desc("fraction")
            .draw()
            .map_err(|e| e.to_string())?;
        for s in series {
            let mut sorted: Vec<f64> = s
                .samples
                .iter()
                .copied()
                .filter(|v| v.is_finite())
                .map(|v| v.max(low))
                .collect();
            sorted.sort_by(f64::total_cmp);
            let n = sorted.len() as f64;
            let points = sorted
                .iter()
                .enumerate()
                .map(|(i, v)| (*v, (i + 1) as f64 / n));
            let color = s.color;
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(format!("{} (n = {})", s.label, sorted.len()))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plot_is_an_svg_with_its_title_and_legend() {
        let svg = cdf_svg(
            "a run",
            &[
                Series {
                    samples: &[1.0, 2.5, 40.0],
                    label: "time to all nodes",
                    color: RED,
                },
                Series {
                    samples: &[],
                    label: "per-node delivery",
                    color: BLUE,
                },
            ],
        )
        .unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("a run"));
        assert!(svg.contains("time to all nodes (n = 3)"));
        assert!(svg.contains("per-node delivery (n = 0)"));
        assert!(svg.contains("log scale"));
    }
}
