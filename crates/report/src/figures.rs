//! Drawing: every [`Plot`] to a PNG (bytes) and an SVG (text), in memory, with plotters'
//! pure-Rust backends and the DejaVu Sans font shipped in `assets/` (registered from bytes,
//! so no system fonts or fontconfig are needed).
use crate::analyse::{Plot, PlotKind, RankPanel, StepPanel};
use crate::ReportError;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::sync::OnceLock;

/// DejaVu Sans (Bitstream Vera licence, see `assets/DejaVuSans-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// A drawn figure.
#[derive(Debug, Clone)]
pub struct Figure {
    /// File stem.
    pub name: String,
    /// Title.
    pub title: String,
    /// Caption.
    pub caption: String,
    /// PNG file contents.
    pub png: Vec<u8>,
    /// SVG document.
    pub svg: String,
    /// Pixel size.
    pub size: (u32, u32),
}

fn register() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| "the bundled DejaVu Sans font is invalid".to_string())
    })
    .clone()
}

/// Size of a figure in pixels.
fn size_of(plot: &Plot) -> (u32, u32) {
    match &plot.kind {
        PlotKind::Rank(p) => {
            let n = p.len().max(1) as u32;
            let cols = n.min(4);
            let rows = n.div_ceil(cols);
            (cols * 380 + 20, rows * 360 + 50)
        }
        PlotKind::Step { panels, .. } => (panels.len().clamp(1, 3) as u32 * 520, 440),
        PlotKind::Heat { rows, cols, .. } => (
            (cols.len() as u32 * 70 + 260)
                .max(plot.title.chars().count() as u32 * 11 + 40)
                .max(520),
            (rows.len() as u32 * 18 + 150).clamp(300, 1400),
        ),
    }
}

/// Draws one plot to PNG and SVG.
///
/// # Errors
/// [`ReportError::Plot`] when plotters fails (e.g. the font cannot be read).
pub fn draw(plot: &Plot) -> Result<Figure, ReportError> {
    let err = |what: String| ReportError::Plot {
        name: plot.name.clone(),
        what,
    };
    register().map_err(err)?;
    let (w, h) = size_of(plot);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw_on(&root, plot).map_err(err)?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    let png = encode_png(&rgb, w, h).map_err(err)?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        draw_on(&root, plot).map_err(err)?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(Figure {
        name: plot.name.clone(),
        title: plot.title.clone(),
        caption: plot.caption.clone(),
        png,
        svg,
        size: (w, h),
    })
}

fn encode_png(rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Best);
        let mut wr = enc.write_header().map_err(|e| e.to_string())?;
        wr.write_image_data(rgb).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

type Area<DB> = DrawingArea<DB, Shift>;

fn draw_on<DB: DrawingBackend>(root: &Area<DB>, plot: &Plot) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let body = root
        .titled(&plot.title, (FAMILY, 20))
        .map_err(|e| e.to_string())?;
    match &plot.kind {
        PlotKind::Rank(panels) => {
            let n = panels.len().max(1);
            let cols = n.min(4);
            let rows = n.div_ceil(cols);
            let areas = body.split_evenly((rows, cols));
            for (area, panel) in areas.iter().zip(panels) {
                rank_panel(area, panel)?;
            }
        }
        PlotKind::Step {
            y_label,
            log_y,
            panels,
        } => {
            let n = panels.len().clamp(1, 3);
            let areas = body.split_evenly((1, n));
            // One y range for all panels, so LoRA and rsLoRA compare at a glance.
            let ys = panels
                .iter()
                .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
            let ys: Vec<f64> = ys
                .filter(|y| y.is_finite() && (!*log_y || *y > 0.0))
                .collect();
            let range = (
                ys.iter().copied().fold(f64::INFINITY, f64::min),
                ys.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            );
            for (area, panel) in areas.iter().zip(panels) {
                step_panel(area, panel, y_label, *log_y, range)?;
            }
        }
        PlotKind::Heat {
            rows,
            cols,
            values,
            predicted,
        } => heatmap(&body, rows, cols, values, *predicted)?,
    }
    Ok(())
}

/// Distinct colours for series (colour-blind-friendly Okabe-Ito, then tab10-like).
const SERIES: [RGBColor; 10] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
    RGBColor(140, 86, 75),
    RGBColor(148, 103, 189),
    RGBColor(0, 0, 0),
];

/// Viridis at t in [0, 1] (five anchors, linear in between): ordered colours for ranks.
fn viridis(t: f64) -> RGBColor {
    const A: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (220.0, 200.0, 30.0),
    ];
    let t = t.clamp(0.0, 1.0) * 4.0;
    let i = (t.floor() as usize).min(3);
    let f = t - i as f64;
    let mix = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    RGBColor(
        mix(A[i].0, A[i + 1].0),
        mix(A[i].1, A[i + 1].1),
        mix(A[i].2, A[i + 1].2),
    )
}

/// Blue - white - red for exponents, t in [-1, 1].
fn diverging(t: f64) -> RGBColor {
    let t = t.clamp(-1.0, 1.0);
    let (r, g, b) = if t < 0.0 {
        let f = -t;
        (
            255.0 - f * (255.0 - 33.0),
            255.0 - f * (255.0 - 102.0),
            255.0 - f * (255.0 - 172.0),
        )
    } else {
        (
            255.0 - t * (255.0 - 178.0),
            255.0 - t * (255.0 - 24.0),
            255.0 - t * (255.0 - 43.0),
        )
    };
    RGBColor(r.round() as u8, g.round() as u8, b.round() as u8)
}

/// Log-axis range around `lo..hi` with a margin; degenerate ranges are widened.
fn log_range(lo: f64, hi: f64) -> (f64, f64) {
    let (lo, hi) = if lo.is_finite() && hi.is_finite() && lo > 0.0 {
        (lo, hi.max(lo))
    } else {
        (1.0, 10.0)
    };
    if hi / lo < 1.5 {
        let c = (lo * hi).sqrt();
        (c / 2.0, c * 2.0)
    } else {
        let pad = (hi / lo).powf(0.06);
        (lo / pad, hi * pad)
    }
}

fn sci(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if (0.01..1000.0).contains(&v.abs()) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.0e}")
    }
}

fn rank_panel<DB: DrawingBackend>(area: &Area<DB>, panel: &RankPanel) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let xs = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0));
    let (xmin, xmax) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let ys = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().flat_map(|p| [p.1, p.2, p.3]))
        .filter(|v| *v > 0.0 && v.is_finite());
    let (ymin, ymax) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let (x0, x1) = log_range(xmin, xmax);
    let (y0, y1) = log_range(ymin, ymax);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FAMILY, 16))
        .margin(8)
        .x_label_area_size(38)
        .y_label_area_size(62)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("rank r")
        .y_desc(panel.y_label.as_str())
        .x_labels(8)
        .y_labels(6)
        .x_label_formatter(&|x| sci(*x))
        .y_label_formatter(&|y| sci(*y))
        .label_style((FAMILY, 12))
        .light_line_style(WHITE)
        .draw()
        .map_err(e)?;
    for (i, s) in panel.series.iter().enumerate() {
        let color = SERIES[i % SERIES.len()];
        let style = ShapeStyle::from(color).filled();
        chart
            .draw_series(
                s.points
                    .iter()
                    .map(|&(x, m, _, _)| Circle::new((x, m), 3, style)),
            )
            .map_err(e)?
            .label(s.label.as_str())
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, ShapeStyle::from(color).filled()));
        chart
            .draw_series(
                s.points
                    .iter()
                    .filter(|p| p.2 < p.3)
                    .map(|&(x, _, lo, hi)| {
                        PathElement::new(
                            vec![(x, lo.max(y0)), (x, hi.min(y1))],
                            color.stroke_width(1),
                        )
                    }),
            )
            .map_err(e)?;
        // Lines through the centroid of the log points: fitted solid, predicted dashed.
        let n = s.points.len() as f64;
        if n < 1.0 {
            continue;
        }
        let cx = s.points.iter().map(|p| p.0.ln()).sum::<f64>() / n;
        let cy = s.points.iter().map(|p| p.1.ln()).sum::<f64>() / n;
        let line = |slope: f64| -> Vec<(f64, f64)> {
            let (a, b) = (s.points[0].0, s.points[s.points.len() - 1].0);
            [a, b]
                .iter()
                .map(|&x| (x, (cy + slope * (x.ln() - cx)).exp()))
                .filter(|p| p.1 >= y0 && p.1 <= y1)
                .collect()
        };
        if let Some(f) = s.fitted {
            chart
                .draw_series(LineSeries::new(line(f), color.stroke_width(1)))
                .map_err(e)?;
        }
        if let Some(p) = s.predicted {
            chart
                .draw_series(DashedLineSeries::new(
                    line(p),
                    8,
                    6,
                    color.mix(0.8).stroke_width(3),
                ))
                .map_err(e)?;
        }
    }
    // Legend where the curves are not: top right when they mostly fall, bottom right when
    // they rise.
    let mean_fit = panel.series.iter().filter_map(|s| s.fitted).sum::<f64>();
    let position = if mean_fit <= 0.0 {
        SeriesLabelPosition::UpperRight
    } else {
        SeriesLabelPosition::LowerRight
    };
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FAMILY, 11))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()
        .map_err(e)?;
    Ok(())
}

fn step_panel<DB: DrawingBackend>(
    area: &Area<DB>,
    panel: &StepPanel,
    y_label: &str,
    log_y: bool,
    (ymin, ymax): (f64, f64),
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let pts = panel.series.iter().flat_map(|s| s.points.iter());
    let (xmin, xmax) = pts.fold((f64::INFINITY, f64::NEG_INFINITY), |acc, &(x, y)| {
        if y.is_finite() && (!log_y || y > 0.0) {
            (acc.0.min(x), acc.1.max(x))
        } else {
            acc
        }
    });
    let (x0, x1) = if xmin.is_finite() && xmax > xmin {
        (xmin, xmax)
    } else {
        (xmin.min(0.0), xmin.max(0.0) + 1.0)
    };
    let (x0, x1) = if x0.is_finite() { (x0, x1) } else { (0.0, 1.0) };
    let ranks: Vec<u32> = {
        let mut r: Vec<u32> = panel.series.iter().map(|s| s.rank).collect();
        r.sort_unstable();
        r.dedup();
        r
    };
    let color_of = |rank: u32| {
        let i = ranks.iter().position(|&r| r == rank).unwrap_or(0);
        viridis(if ranks.len() > 1 {
            i as f64 / (ranks.len() - 1) as f64
        } else {
            0.0
        })
    };
    // A log axis shows only powers of ten: use it when the curves span more than a decade.
    let log_y = log_y && ymin > 0.0 && ymax / ymin > 10.0;
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(&panel.title, (FAMILY, 16))
        .margin(8)
        .x_label_area_size(38)
        .y_label_area_size(62);
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc(y_label)
                .x_labels(8)
                .y_labels(8)
                .x_label_formatter(&|x| {
                    if x1 - x0 >= 5.0 {
                        format!("{x:.0}")
                    } else {
                        sci(*x)
                    }
                })
                .y_label_formatter(&|y| sci(*y))
                .label_style((FAMILY, 12))
                .light_line_style(WHITE)
                .draw()
                .map_err(e)?;
            for s in &panel.series {
                let color = color_of(s.rank);
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|p| p.1.is_finite() && (!log_y || p.1 > 0.0))
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                    .map_err(e)?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font((FAMILY, 11))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .draw()
                .map_err(e)?;
        }};
    }
    if log_y {
        let (y0, y1) = log_range(ymin, ymax);
        finish!(builder
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .map_err(e)?);
    } else {
        let (y0, y1) = if ymin.is_finite() && ymax > ymin {
            let pad = (ymax - ymin) * 0.05;
            (ymin - pad, ymax + pad)
        } else if ymin.is_finite() {
            (ymin - 0.5, ymin + 0.5)
        } else {
            (0.0, 1.0)
        };
        finish!(builder.build_cartesian_2d(x0..x1, y0..y1).map_err(e)?);
    }
    Ok(())
}

fn heatmap<DB: DrawingBackend>(
    area: &Area<DB>,
    rows: &[String],
    cols: &[String],
    values: &[Vec<Option<f64>>],
    predicted: Option<f64>,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let vmax = values
        .iter()
        .flatten()
        .flatten()
        .filter(|v| v.is_finite())
        .fold(0.5f64, |a, v| a.max(v.abs()));
    let (w, _) = area.dim_in_pixel();
    let (main, bar) = area.split_horizontally(w.saturating_sub(110));
    let (nc, nr) = (cols.len().max(1) as i32, rows.len().max(1) as i32);
    let mut chart = ChartBuilder::on(&main)
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(80)
        // 0..=n-1 segmented: n segments, the right (top) edge of the last is SegmentValue::Last.
        .build_cartesian_2d((0..nc - 1).into_segmented(), (0..nr - 1).into_segmented())
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(cols.len().max(1))
        .y_labels(rows.len().max(1))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => cols.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => rows.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .label_style((FAMILY, 11))
        .draw()
        .map_err(e)?;
    let edge = |i: i32, n: i32| {
        if i >= n {
            SegmentValue::Last
        } else {
            SegmentValue::Exact(i)
        }
    };
    let cells = rows.len() * cols.len();
    for (ri, row) in values.iter().enumerate() {
        for (ci, v) in row.iter().enumerate() {
            let (ri, ci) = (ri as i32, ci as i32);
            let color = match v {
                Some(v) if v.is_finite() => diverging(v / vmax),
                _ => RGBColor(200, 200, 200),
            };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [
                        (SegmentValue::Exact(ci), SegmentValue::Exact(ri)),
                        (edge(ci + 1, nc), edge(ri + 1, nr)),
                    ],
                    color.filled(),
                )))
                .map_err(e)?;
            if cells <= 160 {
                if let Some(v) = v {
                    let text = format!("{v:+.2}");
                    chart
                        .draw_series(std::iter::once(
                            EmptyElement::at((
                                SegmentValue::CenterOf(ci),
                                SegmentValue::CenterOf(ri),
                            )) + Text::new(text, (-16, -6), (FAMILY, 11)),
                        ))
                        .map_err(e)?;
                }
            }
        }
    }
    // Colour bar.
    let mut cb = ChartBuilder::on(&bar)
        .margin_top(10)
        .margin_bottom(50)
        .margin_right(40)
        .y_label_area_size(40)
        .caption(
            predicted.map_or("slope".to_string(), |p| format!("pred {p:+.2}")),
            (FAMILY, 11),
        )
        .build_cartesian_2d(0.0..1.0, -vmax..vmax)
        .map_err(e)?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(5)
        .y_label_formatter(&|y| format!("{y:+.1}"))
        .label_style((FAMILY, 11))
        .draw()
        .map_err(e)?;
    let steps = 60;
    cb.draw_series((0..steps).map(|i| {
        let a = -vmax + 2.0 * vmax * i as f64 / steps as f64;
        let b = -vmax + 2.0 * vmax * (i + 1) as f64 / steps as f64;
        Rectangle::new(
            [(0.0, a), (1.0, b)],
            diverging((a + b) / 2.0 / vmax).filled(),
        )
    }))
    .map_err(e)?;
    if let Some(p) = predicted.filter(|p| p.abs() <= vmax) {
        cb.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, p), (1.0, p)],
            BLACK.stroke_width(2),
        )))
        .map_err(e)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analyse::{RankSeries, StepSeries};

    fn rank_plot() -> Plot {
        let pts = |s: f64| {
            (0..5)
                .map(|i| {
                    let r = 4.0 * 4f64.powi(i);
                    let m = r.powf(s);
                    (r, m, m * 0.9, m * 1.1)
                })
                .collect::<Vec<_>>()
        };
        Plot {
            name: "t".into(),
            title: "E|fwd|^2 vs rank <test & \"quotes\">".into(),
            caption: String::new(),
            kind: PlotKind::Rank(vec![RankPanel {
                title: "step 1".into(),
                y_label: "E|fwd|^2".into(),
                series: vec![
                    RankSeries {
                        label: "lora".into(),
                        points: pts(-2.0),
                        fitted: Some(-2.0),
                        predicted: Some(-1.9),
                    },
                    RankSeries {
                        label: "rslora".into(),
                        points: pts(0.0),
                        fitted: Some(0.0),
                        predicted: Some(0.0),
                    },
                ],
            }]),
        }
    }

    #[test]
    fn png_has_signature_and_is_not_blank() {
        let f = draw(&rank_plot()).expect("draws");
        assert_eq!(&f.png[..8], b"\x89PNG\r\n\x1a\n");
        let dec = png::Decoder::new(f.png.as_slice());
        let mut reader = dec.read_info().expect("decodes");
        let mut buf = vec![0; reader.output_buffer_size()];
        reader.next_frame(&mut buf).expect("frame");
        let non_white = buf.chunks(3).filter(|p| p != &[255, 255, 255]).count();
        assert!(non_white > 2000, "only {non_white} drawn pixels");
    }

    #[test]
    fn svg_is_well_formed_and_escapes_text() {
        let f = draw(&rank_plot()).expect("draws");
        assert!(
            f.svg.starts_with("<svg") || f.svg.starts_with("<?xml"),
            "{}",
            &f.svg[..60]
        );
        assert!(f.svg.trim_end().ends_with("</svg>"));
        assert!(!f.svg.contains("<test &"), "raw title text in the SVG");
        assert!(f.svg.contains("&lt;test &amp;"), "escaped title missing");
        roxmltree::Document::parse(&f.svg).expect("SVG parses as XML");
    }

    #[test]
    fn step_and_heat_plots_draw() {
        let step = Plot {
            name: "s".into(),
            title: "grad".into(),
            caption: String::new(),
            kind: PlotKind::Step {
                y_label: "norm".into(),
                log_y: true,
                panels: vec![
                    StepPanel {
                        title: "lora".into(),
                        series: vec![StepSeries {
                            label: "r=4".into(),
                            rank: 4,
                            points: vec![(0.0, 1.0), (1.0, 0.5)],
                        }],
                    },
                    StepPanel {
                        title: "rslora".into(),
                        series: vec![StepSeries {
                            label: "r=4".into(),
                            rank: 4,
                            points: vec![(0.0, 1.0)],
                        }],
                    },
                ],
            },
        };
        let f = draw(&step).expect("draws");
        assert_eq!(&f.png[1..4], b"PNG");
        let heat = Plot {
            name: "h".into(),
            title: "heat".into(),
            caption: String::new(),
            kind: PlotKind::Heat {
                rows: vec!["layer 0".into(), "layer 1".into()],
                cols: vec!["q_proj".into(), "v_proj".into()],
                values: vec![vec![Some(-1.0), None], vec![Some(0.2), Some(f64::NAN)]],
                predicted: Some(0.0),
            },
        };
        let f = draw(&heat).expect("draws");
        roxmltree::Document::parse(&f.svg).expect("SVG parses");
    }

    #[test]
    fn empty_and_degenerate_data_still_draw() {
        let p = Plot {
            name: "e".into(),
            title: "empty".into(),
            caption: String::new(),
            kind: PlotKind::Rank(vec![RankPanel {
                title: "step 1".into(),
                y_label: "y".into(),
                series: vec![RankSeries {
                    label: "one".into(),
                    points: vec![(4.0, 1.0, 1.0, 1.0)],
                    fitted: None,
                    predicted: None,
                }],
            }]),
        };
        draw(&p).expect("draws");
    }

    #[test]
    fn colour_maps_are_in_range() {
        assert_eq!(diverging(0.0), RGBColor(255, 255, 255));
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(220, 200, 30));
    }
}
