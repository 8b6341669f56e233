//! Drawing: every [`Plot`] to a PNG (bytes) and an SVG (text), in memory, with plotters'
//! pure-Rust backends and the DejaVu Sans font shipped in `assets/` (registered from bytes,
//! so no system fonts or fontconfig are needed).
use crate::analyse::{
    HeadlinePoint, LrPanel, Plot, PlotKind, RankPanel, StepPanel, XyAxis, XyPanel,
};
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

/// Height of a legend below a rank panel with `n` entries.
fn legend_height(n: usize) -> u32 {
    n as u32 * 18 + 10
}

/// Width of the legend strip to the right of curves against step.
const STEP_LEGEND: u32 = 110;
/// Width of the legend strip to the right of loss-vs-learning-rate curves.
const LR_LEGEND: u32 = 210;
/// Entries of an [`XyPanel`]'s legend at most (points, line, edge marks).
const XY_LEGEND_ENTRIES: usize = 3;

/// How a legend entry is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    /// A filled dot.
    Dot,
    /// A solid line.
    Line,
    /// A dashed line.
    Dashed,
    /// A filled triangle pointing up.
    Triangle,
    /// A cross.
    Cross,
}

/// Size of a figure in pixels.
fn size_of(plot: &Plot) -> (u32, u32) {
    match &plot.kind {
        PlotKind::Rank(p) => {
            let n = p.len().max(1) as u32;
            let cols = n.min(4);
            let rows = n.div_ceil(cols);
            let most = p.iter().map(|p| p.series.len()).max().unwrap_or(0);
            (cols * 380 + 20, rows * (360 + legend_height(most)) + 50)
        }
        PlotKind::Step { panels, .. } => (panels.len().clamp(1, 3) as u32 * 500 + STEP_LEGEND, 440),
        PlotKind::Heat { rows, cols, .. } => (
            (cols.len() as u32 * 70 + 260)
                .max(plot.title.chars().count() as u32 * 11 + 40)
                .max(520),
            (rows.len() as u32 * 18 + 150).clamp(300, 1400),
        ),
        PlotKind::Forest(points) => (880, points.len() as u32 * 26 + 110),
        PlotKind::LrCurves(p) => {
            let n = p.len().max(1) as u32;
            let cols = lr_columns(n as usize) as u32;
            (cols * 440 + LR_LEGEND, n.div_ceil(cols) * 400 + 50)
        }
        PlotKind::Xy(p) => {
            let n = p.len().max(1) as u32;
            let cols = n.min(4);
            (
                cols * 390 + 20,
                n.div_ceil(cols) * (340 + legend_height(XY_LEGEND_ENTRIES)) + 50,
            )
        }
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
            let (w, _) = body.dim_in_pixel();
            let (plots_area, legend_area) = body.split_horizontally(w.saturating_sub(STEP_LEGEND));
            let areas = plots_area.split_evenly((1, n));
            // One legend for all panels (the ranks), outside the data area.
            let mut ranks: Vec<u32> = panels
                .iter()
                .flat_map(|p| p.series.iter().map(|s| s.rank))
                .collect();
            ranks.sort_unstable();
            ranks.dedup();
            let entries: Vec<(String, RGBColor, Mark)> = ranks
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("r = {r}"), rank_colour(i, ranks.len()), Mark::Line))
                .collect();
            legend(&legend_area, "rank", &entries, 40)?;
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
                step_panel(area, panel, y_label, *log_y, range, &ranks)?;
            }
        }
        PlotKind::Heat {
            rows,
            cols,
            values,
            predicted,
        } => heatmap(&body, rows, cols, values, *predicted)?,
        PlotKind::Forest(points) => forest(&body, points)?,
        PlotKind::LrCurves(panels) => lr_curves(&body, panels)?,
        PlotKind::Xy(panels) => {
            let n = panels.len().max(1);
            let cols = n.min(4);
            let areas = body.split_evenly((n.div_ceil(cols), cols));
            for (area, panel) in areas.iter().zip(panels) {
                xy_panel(area, panel)?;
            }
        }
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

/// A tick label: plain digits between 1e-3 and 1e6 (enough decimals to tell neighbouring
/// ticks apart: 50100 and 50150, not "5e4" twice), scientific with two digits outside.
fn tick(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { format!("{v}") };
    }
    let a = v.abs();
    if (1e-3..1e6).contains(&a) {
        let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
        let s = format!("{v:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    } else {
        let s = format!("{v:.1e}");
        s.replace(".0e", "e")
    }
}

/// Ticks of a log axis over `lo..hi`: 1, 2, 5 times powers of ten, thinned to at most eight,
/// and at least two (geometric points rounded to two digits when the range is narrow).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo > 0.0 && hi > lo && lo.is_finite() && hi.is_finite()) {
        return vec![lo];
    }
    let (k0, k1) = (lo.log10().floor() as i32 - 1, hi.log10().ceil() as i32 + 1);
    let at = |mults: &[f64]| -> Vec<f64> {
        (k0..=k1)
            .flat_map(|k| mults.iter().map(move |m| m * 10f64.powi(k)))
            .filter(|v| *v >= lo && *v <= hi)
            .collect()
    };
    let thin = |t: Vec<f64>| -> Vec<f64> {
        let stride = t.len().div_ceil(8).max(1);
        t.into_iter().step_by(stride).collect()
    };
    let t = at(&[1.0, 2.0, 5.0]);
    if (2..=8).contains(&t.len()) {
        return t;
    }
    if t.len() > 8 {
        return thin(at(&[1.0]));
    }
    let fine = at(&[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    if fine.len() >= 2 {
        return thin(fine);
    }
    // A range narrower than one step of that set: geometric points, two significant digits.
    (0..4)
        .map(|i| {
            let v = lo * (hi / lo).powf((0.5 + i as f64) / 4.0);
            let mag = 10f64.powi(v.log10().floor() as i32 - 1);
            (v / mag).round() * mag
        })
        .collect()
}

/// A step or row label: the integer, nothing for a point between integers.
fn integer_label(x: f64) -> String {
    if (x - x.round()).abs() < 1e-6 {
        format!("{:.0}", x.round())
    } else {
        String::new()
    }
}

/// Viridis colour of the i-th of n ranks.
fn rank_colour(i: usize, n: usize) -> RGBColor {
    viridis(if n > 1 {
        i as f64 / (n - 1) as f64
    } else {
        0.0
    })
}

/// A legend drawn in its own area (outside every data area): a title, then one entry per
/// line, its mark and its text.
fn legend<DB: DrawingBackend>(
    area: &Area<DB>,
    title: &str,
    entries: &[(String, RGBColor, Mark)],
    top: i32,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let mut y = top;
    if !title.is_empty() {
        area.draw(&Text::new(title.to_string(), (6, y), (FAMILY, 12)))
            .map_err(e)?;
        y += 18;
    }
    for (label, color, mark) in entries {
        match mark {
            Mark::Dot => area
                .draw(&Circle::new((12, y + 6), 4, color.filled()))
                .map_err(e)?,
            Mark::Line => area
                .draw(&PathElement::new(
                    vec![(4, y + 6), (22, y + 6)],
                    color.stroke_width(3),
                ))
                .map_err(e)?,
            Mark::Dashed => {
                for x in [4, 11, 18] {
                    area.draw(&PathElement::new(
                        vec![(x, y + 6), (x + 4, y + 6)],
                        color.stroke_width(2),
                    ))
                    .map_err(e)?;
                }
            }
            Mark::Triangle => area
                .draw(&TriangleMarker::new((12, y + 7), 6, color.filled()))
                .map_err(e)?,
            Mark::Cross => area
                .draw(&Cross::new((12, y + 6), 4, color.stroke_width(2)))
                .map_err(e)?,
        }
        area.draw(&Text::new(label.clone(), (28, y), (FAMILY, 11)))
            .map_err(e)?;
        y += 18;
    }
    Ok(())
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
    // Every rank present is a tick (4, 8, 16, ...), not only the powers of ten.
    let mut ranks: Vec<f64> = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    ranks.sort_by(f64::total_cmp);
    ranks.dedup();
    let (_, h) = area.dim_in_pixel();
    let (plot_area, legend_area) =
        area.split_vertically(h.saturating_sub(legend_height(panel.series.len())));
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(&panel.title, (FAMILY, 16))
        .margin(8)
        .x_label_area_size(38)
        .y_label_area_size(62)
        .build_cartesian_2d(
            (x0..x1).log_scale().with_key_points(ranks),
            (y0..y1).log_scale().with_key_points(log_ticks(y0, y1)),
        )
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("rank r")
        .y_desc(panel.y_label.as_str())
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| tick(*y))
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
            .map_err(e)?;
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
    // The legend below the data area, never over the points.
    let entries: Vec<(String, RGBColor, Mark)> = panel
        .series
        .iter()
        .enumerate()
        .map(|(i, s)| (s.label.clone(), SERIES[i % SERIES.len()], Mark::Dot))
        .collect();
    legend(&legend_area, "", &entries, 2)?;
    Ok(())
}

fn step_panel<DB: DrawingBackend>(
    area: &Area<DB>,
    panel: &StepPanel,
    y_label: &str,
    log_y: bool,
    (ymin, ymax): (f64, f64),
    all_ranks: &[u32],
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
        // The figure's legend colours ranks by their order among all panels' ranks.
        let i = all_ranks.iter().position(|&r| r == rank).unwrap_or(0);
        rank_colour(i, all_ranks.len())
    };
    let _ = &ranks;
    let step_labels = ((x1 - x0).round() as usize + 1).clamp(2, 10);
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
                // At most one label per whole step, so the nice spacing is 1, 2, 5, ...:
                // integer steps only.
                .x_labels(step_labels)
                .x_label_formatter(&|x| integer_label(*x))
                .y_labels(8)
                .y_label_formatter(&|y| tick(*y))
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
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                    .map_err(e)?;
                if pts.len() == 1 {
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                        .map_err(e)?;
                }
            }
        }};
    }
    if log_y {
        let (y0, y1) = log_range(ymin, ymax);
        finish!(builder
            .build_cartesian_2d(
                x0..x1,
                (y0..y1).log_scale().with_key_points(log_ticks(y0, y1))
            )
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

/// Exponents, rows x columns, on a diverging map centred on the prediction (white: as
/// predicted; blue below, red above), or on 0 when there is none.
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
    let centre = predicted.filter(|p| p.is_finite()).unwrap_or(0.0);
    let vmax = values
        .iter()
        .flatten()
        .flatten()
        .filter(|v| v.is_finite())
        .fold(0.25f64, |a, v| a.max((v - centre).abs()));
    let (w, _) = area.dim_in_pixel();
    let (main, bar) = area.split_horizontally(w.saturating_sub(120));
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
                Some(v) if v.is_finite() => diverging((v - centre) / vmax),
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
    // Colour bar, centred on the prediction.
    let (lo, hi) = (centre - vmax, centre + vmax);
    let mut cb = ChartBuilder::on(&bar)
        .margin_top(10)
        .margin_bottom(50)
        .margin_right(40)
        .y_label_area_size(44)
        .caption(
            predicted.map_or("slope (white: 0)".to_string(), |p| {
                format!("white: pred {p:+.2}")
            }),
            (FAMILY, 11),
        )
        .build_cartesian_2d(0.0..1.0, lo..hi)
        .map_err(e)?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(5)
        .y_label_formatter(&|y| format!("{y:+.2}"))
        .label_style((FAMILY, 11))
        .draw()
        .map_err(e)?;
    let steps = 60;
    cb.draw_series((0..steps).map(|i| {
        let a = lo + 2.0 * vmax * i as f64 / steps as f64;
        let b = lo + 2.0 * vmax * (i + 1) as f64 / steps as f64;
        Rectangle::new(
            [(0.0, a), (1.0, b)],
            diverging(((a + b) / 2.0 - centre) / vmax).filled(),
        )
    }))
    .map_err(e)?;
    cb.draw_series(std::iter::once(PathElement::new(
        vec![(0.0, centre), (1.0, centre)],
        BLACK.stroke_width(2),
    )))
    .map_err(e)?;
    Ok(())
}

/// Colour of an outcome: green agrees, red disagrees, grey inconclusive.
fn outcome_colour(o: rankstab_records::Outcome) -> RGBColor {
    match o {
        rankstab_records::Outcome::Agrees => RGBColor(27, 120, 55),
        rankstab_records::Outcome::Disagrees => RGBColor(200, 30, 30),
        rankstab_records::Outcome::Inconclusive => RGBColor(120, 120, 120),
    }
}

/// The headline figure: one row per primary fit, its exponent with the 90% interval
/// against the predicted band (shaded), and a dotted line at 0 (rank-flat).
fn forest<DB: DrawingBackend>(area: &Area<DB>, points: &[HeadlinePoint]) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let n = points.len().max(1);
    let xs = points
        .iter()
        .flat_map(|p| {
            let band = p.predicted.zip(p.band).map(|(c, b)| [c - b, c + b]);
            [p.lo90, p.hi90, p.slope, 0.0]
                .into_iter()
                .chain(band.into_iter().flatten())
        })
        .filter(|x| x.is_finite());
    let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let pad = ((hi - lo) * 0.06).max(0.05);
    let (x0, x1) = if lo.is_finite() {
        (lo - pad, hi + pad)
    } else {
        (-1.0, 1.0)
    };
    let (w, _) = area.dim_in_pixel();
    let (plot_area, legend_area) = area.split_horizontally(w.saturating_sub(150));
    // Row i sits at y = n - 1 - i (the first point on top); a label at every row (n labels
    // over a range of n + 0.2: the nice spacing is 1).
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(360)
        .build_cartesian_2d(x0..x1, -0.6..n as f64 - 0.4)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("rank exponent (slope of log moment against log rank)")
        .y_labels(n)
        .y_label_formatter(&|y| {
            if integer_label(*y).is_empty() {
                return String::new();
            }
            let i = n as i64 - 1 - y.round() as i64;
            points
                .get(usize::try_from(i).unwrap_or(usize::MAX))
                .map_or(String::new(), |p| p.label.clone())
        })
        .x_label_formatter(&|x| format!("{x:+.1}"))
        .label_style((FAMILY, 15))
        .light_line_style(WHITE)
        .draw()
        .map_err(e)?;
    let y_of = |i: usize| (n - 1 - i) as f64;
    chart
        .draw_series(points.iter().enumerate().filter_map(|(i, p)| {
            let (c, b) = p.predicted.zip(p.band)?;
            let y = y_of(i);
            Some(Rectangle::new(
                [(c - b, y - 0.38), (c + b, y + 0.38)],
                RGBColor(150, 170, 200).mix(0.45).filled(),
            ))
        }))
        .map_err(e)?;
    chart
        .draw_series(DashedLineSeries::new(
            vec![(0.0, -0.6), (0.0, n as f64 - 0.4)],
            4,
            4,
            RGBColor(60, 60, 60).stroke_width(1),
        ))
        .map_err(e)?;
    for (i, p) in points.iter().enumerate() {
        let y = y_of(i);
        let c = outcome_colour(p.outcome);
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(p.lo90.max(x0), y), (p.hi90.min(x1), y)],
                c.stroke_width(3),
            )))
            .map_err(e)?;
        chart
            .draw_series(std::iter::once(Circle::new((p.slope, y), 5, c.filled())))
            .map_err(e)?;
    }
    legend(
        &legend_area,
        "outcome",
        &[
            (
                "agrees".into(),
                outcome_colour(rankstab_records::Outcome::Agrees),
                Mark::Dot,
            ),
            (
                "disagrees".into(),
                outcome_colour(rankstab_records::Outcome::Disagrees),
                Mark::Dot,
            ),
            (
                "inconclusive".into(),
                outcome_colour(rankstab_records::Outcome::Inconclusive),
                Mark::Dot,
            ),
            ("predicted band".into(), RGBColor(150, 170, 200), Mark::Line),
        ],
        20,
    )?;
    Ok(())
}

/// Ticks at the powers of `base` within `lo..hi` (at most eight, evenly thinned); the
/// ticks of [`dense_log_ticks`] (1-2-5 or finer) when fewer than three powers fall in the
/// range.
fn power_ticks(lo: f64, hi: f64, base: f64) -> Vec<f64> {
    if !(lo > 0.0 && hi > lo && lo.is_finite() && hi.is_finite()) {
        return log_ticks(lo, hi);
    }
    // A small allowance: ln(1e-4) / ln(10) is not exactly -4.
    let (k0, k1) = (
        (lo.ln() / base.ln() - 1e-9).ceil() as i32,
        (hi.ln() / base.ln() + 1e-9).floor() as i32,
    );
    let power = |k: i32| {
        if k < 0 {
            1.0 / base.powi(-k)
        } else {
            base.powi(k)
        }
    };
    let t: Vec<f64> = (k0..=k1).map(power).collect();
    if t.len() < 3 {
        return dense_log_ticks(lo, hi);
    }
    let stride = t.len().div_ceil(8).max(1);
    t.into_iter().step_by(stride).collect()
}

/// [`log_ticks`], with the finer 1, 1.5, 2, 3, ... 9 set when it gives fewer than three
/// ticks (a range of one decade or less).
fn dense_log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let t = log_ticks(lo, hi);
    if t.len() >= 3 || !(lo > 0.0 && hi > lo && lo.is_finite() && hi.is_finite()) {
        return t;
    }
    let (k0, k1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let fine: Vec<f64> = (k0..=k1)
        .flat_map(|k| {
            [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
                .into_iter()
                .map(move |m| m * 10f64.powi(k))
        })
        .filter(|v| *v >= lo && *v <= hi)
        .collect();
    if fine.len() > t.len() {
        let stride = fine.len().div_ceil(8).max(1);
        fine.into_iter().step_by(stride).collect()
    } else {
        t
    }
}

/// Ticks whose labels are all different (the first of a run of equal labels is kept).
fn distinct_labels(ticks: Vec<f64>) -> Vec<f64> {
    let mut seen = std::collections::BTreeSet::new();
    ticks
        .into_iter()
        .filter(|t| seen.insert(tick(*t)))
        .collect()
}

/// The x ticks of a rank or width axis: every value when there are at most ten, else the
/// powers of two among them (or every other value).
fn value_ticks(mut xs: Vec<f64>) -> Vec<f64> {
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    if xs.len() <= 10 {
        return xs;
    }
    let pow2: Vec<f64> = xs
        .iter()
        .copied()
        .filter(|x| x.log2().fract().abs() < 1e-9)
        .collect();
    if (2..=10).contains(&pow2.len()) {
        pow2
    } else {
        let stride = xs.len().div_ceil(10);
        xs.into_iter().step_by(stride).collect()
    }
}

/// Columns of the loss-vs-learning-rate figure: two for four panels (a square), else up
/// to three.
fn lr_columns(n: usize) -> usize {
    if n == 4 {
        2
    } else {
        n.clamp(1, 3)
    }
}

/// Final loss against learning rate: one panel per setting, one curve per rank (viridis),
/// lr* as a triangle, learning rates where some seed diverged as crosses at the top; one
/// legend to the right of every panel.
fn lr_curves<DB: DrawingBackend>(area: &Area<DB>, panels: &[LrPanel]) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let (w, _) = area.dim_in_pixel();
    let (plots_area, legend_area) = area.split_horizontally(w.saturating_sub(LR_LEGEND));
    let n = panels.len().max(1);
    let cols = lr_columns(n);
    let areas = plots_area.split_evenly((n.div_ceil(cols), cols));
    let mut ranks: Vec<u32> = panels
        .iter()
        .flat_map(|p| p.curves.iter().map(|c| c.rank))
        .collect();
    ranks.sort_unstable();
    ranks.dedup();
    let mut entries: Vec<(String, RGBColor, Mark)> = ranks
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("r = {r}"), rank_colour(i, ranks.len()), Mark::Line))
        .collect();
    entries.push((
        "lr* of the rank".into(),
        RGBColor(60, 60, 60),
        Mark::Triangle,
    ));
    if panels.iter().any(|p| {
        p.curves
            .iter()
            .any(|c| c.points.iter().any(|q| q.1.is_none()))
    }) {
        entries.push((
            "some seed diverged (at top)".into(),
            RGBColor(60, 60, 60),
            Mark::Cross,
        ));
    }
    legend(&legend_area, "rank", &entries, 40)?;
    for (a, panel) in areas.iter().zip(panels) {
        lr_panel(a, panel, &ranks)?;
    }
    Ok(())
}

fn lr_panel<DB: DrawingBackend>(
    area: &Area<DB>,
    panel: &LrPanel,
    all_ranks: &[u32],
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let fold = |it: &mut dyn Iterator<Item = f64>| {
        it.filter(|v| v.is_finite() && *v > 0.0)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            })
    };
    let (xmin, xmax) = fold(
        &mut panel
            .curves
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.0)),
    );
    let (ymin, ymax) = fold(&mut panel.curves.iter().flat_map(|c| {
        c.points
            .iter()
            .filter_map(|p| p.1)
            .chain(c.opt.map(|o| o.1))
    }));
    let (x0, x1) = log_range(xmin, xmax);
    let (y0, y1) = log_range(ymin, ymax);
    let diverged = panel
        .curves
        .iter()
        .any(|c| c.points.iter().any(|p| p.1.is_none()));
    // Room above the data for the crosses, one row per rank.
    let rows = all_ranks.len().max(1) as f64;
    let (l0, l1) = (y0.ln(), y1.ln());
    let head = if diverged { 0.04 + 0.03 * rows } else { 0.0 };
    // Ticks over the data only: the crosses' rows above are not loss values.
    let y_ticks = distinct_labels(dense_log_ticks(y0, y1));
    let y1 = (l1 + head * (l1 - l0)).exp();
    let cross_y = |i: usize| (l1 + (0.03 + 0.03 * i as f64) * (l1 - l0)).exp();
    let colour_of = |rank: u32| {
        let i = all_ranks.iter().position(|&r| r == rank).unwrap_or(0);
        (i, rank_colour(i, all_ranks.len()))
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FAMILY, 14))
        .margin(8)
        .x_label_area_size(38)
        .y_label_area_size(62)
        .build_cartesian_2d(
            (x0..x1)
                .log_scale()
                .with_key_points(distinct_labels(power_ticks(x0, x1, 10.0))),
            (y0..y1).log_scale().with_key_points(y_ticks),
        )
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("learning rate (A's)")
        .y_desc("final held-out loss")
        .x_label_formatter(&|x| tick(*x))
        .y_label_formatter(&|y| tick(*y))
        .label_style((FAMILY, 12))
        .light_line_style(WHITE)
        .draw()
        .map_err(e)?;
    for c in &panel.curves {
        let (i, colour) = colour_of(c.rank);
        // Broken where a seed diverged: one line per run of finite points.
        let mut segment: Vec<(f64, f64)> = Vec::new();
        let mut segments = Vec::new();
        for &(lr, loss, _) in &c.points {
            match loss.filter(|l| l.is_finite() && *l > 0.0) {
                Some(l) => segment.push((lr, l)),
                None => segments.push(std::mem::take(&mut segment)),
            }
        }
        segments.push(segment);
        for seg in segments.iter().filter(|s| s.len() > 1) {
            chart
                .draw_series(LineSeries::new(seg.clone(), colour.stroke_width(2)))
                .map_err(e)?;
        }
        chart
            .draw_series(
                segments
                    .iter()
                    .flatten()
                    .map(|&p| Circle::new(p, 2, colour.filled())),
            )
            .map_err(e)?;
        chart
            .draw_series(
                c.points
                    .iter()
                    .filter(|p| p.1.is_none())
                    .map(|p| Cross::new((p.0, cross_y(i)), 4, colour.stroke_width(2))),
            )
            .map_err(e)?;
        if let Some((lr, loss)) = c.opt.filter(|o| o.0 > 0.0 && o.1 > 0.0) {
            chart
                .draw_series(std::iter::once(TriangleMarker::new(
                    (lr, loss),
                    7,
                    colour.filled(),
                )))
                .map_err(e)?;
        }
    }
    Ok(())
}

/// Colour of the marks for values without a point (lr* at the grid's edge).
const EDGE_COLOUR: RGBColor = RGBColor(200, 30, 30);

/// A quantity against rank or width, log-log: points with interval bars, a dashed
/// reference line, triangles at the edge for values without a point; its legend below.
fn xy_panel<DB: DrawingBackend>(area: &Area<DB>, panel: &XyPanel) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let line: &[(f64, f64)] = panel.line.as_ref().map_or(&[], |l| l.1.as_slice());
    let xs: Vec<f64> = panel
        .points
        .iter()
        .map(|p| p.0)
        .chain(line.iter().map(|p| p.0))
        .chain(panel.edges.iter().map(|m| m.x))
        .filter(|x| x.is_finite() && *x > 0.0)
        .collect();
    let ys = panel
        .points
        .iter()
        .flat_map(|p| [p.1, p.2, p.3])
        .chain(line.iter().map(|p| p.1))
        .chain(panel.edges.iter().map(|m| m.y))
        .filter(|v| v.is_finite() && *v > 0.0);
    let (ymin, ymax) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let (xmin, xmax) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let (x0, x1) = log_range(xmin, xmax);
    let (y0, y1) = log_range(ymin, ymax);
    let y_ticks = match panel.y_axis {
        XyAxis::Decades => power_ticks(y0, y1, 10.0),
        XyAxis::PowersOfTwo => power_ticks(y0, y1, 2.0),
        XyAxis::Nice => dense_log_ticks(y0, y1),
    };
    let mut entries: Vec<(String, RGBColor, Mark)> =
        vec![(panel.point_label.clone(), SERIES[0], Mark::Dot)];
    if let Some((label, _)) = &panel.line {
        entries.push((label.clone(), SERIES[1], Mark::Dashed));
    }
    if !panel.edges.is_empty() {
        entries.push((
            "lr* at the grid's edge (none located)".into(),
            EDGE_COLOUR,
            Mark::Triangle,
        ));
    }
    let (_, h) = area.dim_in_pixel();
    let (plot_area, legend_area) =
        area.split_vertically(h.saturating_sub(legend_height(XY_LEGEND_ENTRIES)));
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(&panel.title, (FAMILY, 14))
        .margin(8)
        .x_label_area_size(38)
        .y_label_area_size(62)
        .build_cartesian_2d(
            (x0..x1)
                .log_scale()
                .with_key_points(distinct_labels(value_ticks(xs.clone()))),
            (y0..y1)
                .log_scale()
                .with_key_points(distinct_labels(y_ticks)),
        )
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(panel.x_label.as_str())
        .y_desc(panel.y_label.as_str())
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| tick(*y))
        .label_style((FAMILY, 12))
        .light_line_style(WHITE)
        .draw()
        .map_err(e)?;
    if line.len() > 1 {
        chart
            .draw_series(DashedLineSeries::new(
                line.to_vec(),
                8,
                6,
                SERIES[1].stroke_width(2),
            ))
            .map_err(e)?;
    }
    let colour = SERIES[0];
    chart
        .draw_series(
            panel
                .points
                .iter()
                .filter(|p| p.2 < p.3)
                .map(|&(x, _, lo, hi)| {
                    PathElement::new(
                        vec![(x, lo.max(y0)), (x, hi.min(y1))],
                        colour.stroke_width(2),
                    )
                }),
        )
        .map_err(e)?;
    chart
        .draw_series(
            panel
                .points
                .iter()
                .map(|&(x, y, _, _)| Circle::new((x, y), 4, colour.filled())),
        )
        .map_err(e)?;
    for m in &panel.edges {
        let style = EDGE_COLOUR.filled();
        // Pixel offsets around the edge value: pointing up above the grid, down below it.
        let tri = if m.up {
            vec![(-6, 4), (6, 4), (0, -7)]
        } else {
            vec![(-6, -4), (6, -4), (0, 7)]
        };
        chart
            .draw_series(std::iter::once(
                EmptyElement::at((m.x, m.y)) + Polygon::new(tri, style),
            ))
            .map_err(e)?;
    }
    legend(&legend_area, "", &entries, 2)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analyse::{EdgeMark, LrCurve, RankSeries, StepSeries};

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
    fn tick_labels_tell_neighbours_apart() {
        // Perplexities near 5e4 used to read "5e4" at every tick.
        let labels: Vec<String> = [50100.0, 50150.0, 50200.0].map(tick).to_vec();
        assert_eq!(labels, ["50100", "50150", "50200"]);
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(0.0012), "0.0012");
        assert_eq!(tick(2e-9), "2e-9");
        assert_eq!(integer_label(3.0), "3");
        assert_eq!(integer_label(1.5), "");
    }

    #[test]
    fn log_axes_have_ticks_even_within_one_decade() {
        assert_eq!(log_ticks(3.0, 70.0), vec![5.0, 10.0, 20.0, 50.0]);
        // Within one decade: 1-2-5 gives one tick at most, the finer set gives several.
        let t = log_ticks(1.1e-9, 1.9e-9);
        assert!(t.len() >= 2, "{t:?}");
        assert!(t.iter().all(|v| (1.1e-9..=1.9e-9).contains(v)), "{t:?}");
        // Many decades: at most eight.
        assert!(log_ticks(1e-12, 1e3).len() <= 8);
    }

    #[test]
    fn rank_axes_label_every_rank_and_legends_sit_below_the_data() {
        let f = draw(&rank_plot()).expect("draws");
        let texts: Vec<String> = roxmltree::Document::parse(&f.svg)
            .expect("svg")
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(|t| t.trim().to_string()))
            .collect();
        for r in ["4", "16", "64", "256", "1024"] {
            assert!(
                texts.iter().any(|t| t == r),
                "no tick at rank {r}: {texts:?}"
            );
        }
        // y ticks on a log axis spanning powers of ten.
        assert!(texts.iter().any(|t| t.contains("e-")), "{texts:?}");
    }

    #[test]
    fn heatmaps_are_white_at_the_prediction() {
        let heat = |predicted: Option<f64>| Plot {
            name: "h".into(),
            title: "heat".into(),
            caption: String::new(),
            kind: PlotKind::Heat {
                rows: vec!["layer 0".into()],
                cols: vec!["q_proj".into(), "v_proj".into()],
                values: vec![vec![Some(-1.0), Some(-1.0)]],
                predicted,
            },
        };
        // Centred on 0 (no prediction), cells of -1 take the map's darkest blue; centred on
        // a prediction of -1, the same cells are white and that blue appears nowhere.
        let rgb = diverging(-1.0);
        let hex = format!("fill=\"#{:02X}{:02X}{:02X}\"", rgb.0, rgb.1, rgb.2);
        let blue = draw(&heat(None)).expect("draws").svg;
        assert!(blue.contains(&hex), "no {hex} cell");
        let white = draw(&heat(Some(-1.0))).expect("draws").svg;
        assert!(
            !white.contains(&hex),
            "a cell at the prediction is not white"
        );
    }

    fn lr_plot(diverged: bool) -> Plot {
        let curve = |rank: u32, shift: f64| {
            let lrs: Vec<f64> = (0..9).map(|i| 1e-3 * 10f64.powf(i as f64 * 0.5)).collect();
            let points = lrs
                .iter()
                .enumerate()
                .map(|(i, &lr)| {
                    let x = lr.ln() - shift;
                    let loss = 0.5 + 0.05 * x * x;
                    if diverged && i == 8 {
                        (lr, None, 1)
                    } else {
                        (lr, Some(loss), 0)
                    }
                })
                .collect();
            LrCurve {
                label: format!("r = {rank}"),
                rank,
                points,
                opt: Some((shift.exp(), 0.5)),
            }
        };
        Plot {
            name: "lr".into(),
            title: "loss vs lr".into(),
            caption: String::new(),
            kind: PlotKind::LrCurves(vec![LrPanel {
                title: "sgd | rsLoRA | init a".into(),
                curves: vec![curve(2, -4.0), curve(8, -3.0)],
            }]),
        }
    }

    fn svg_texts(svg: &str) -> Vec<String> {
        roxmltree::Document::parse(svg)
            .expect("svg")
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(|t| t.trim().to_string()))
            .collect()
    }

    #[test]
    fn loss_curves_mark_lr_opt_and_diverged_learning_rates() {
        let f = draw(&lr_plot(true)).expect("draws");
        let doc = roxmltree::Document::parse(&f.svg).expect("svg");
        let count = |tag: &str| doc.descendants().filter(|n| n.has_tag_name(tag)).count();
        // Two curves of 8 finite points; two lr* and the legend's triangle.
        assert_eq!(count("circle"), 16);
        assert_eq!(count("polygon"), 3);
        let texts = svg_texts(&f.svg);
        assert!(texts.iter().any(|t| t == "some seed diverged (at top)"));
        // Decades on the learning-rate axis; no label twice on an axis ("1" is on both).
        for t in ["0.001", "0.01", "0.1", "10"] {
            assert_eq!(
                texts.iter().filter(|x| *x == t).count(),
                1,
                "{t}: {texts:?}"
            );
        }
        assert_eq!(texts.iter().filter(|x| *x == "1").count(), 2, "{texts:?}");
        let mut numeric: Vec<&String> = texts
            .iter()
            .filter(|t| *t != "1" && t.parse::<f64>().is_ok())
            .collect();
        let n = numeric.len();
        numeric.sort();
        numeric.dedup();
        assert_eq!(numeric.len(), n, "duplicate tick labels: {texts:?}");
        assert!(n >= 6, "too few ticks: {texts:?}");
        let clean = draw(&lr_plot(false)).expect("draws");
        assert!(!svg_texts(&clean.svg).iter().any(|t| t.contains("diverged")));
    }

    #[test]
    fn xy_panels_mark_edges_and_label_ranks_once() {
        let p = Plot {
            name: "xy".into(),
            title: "lr* vs rank".into(),
            caption: String::new(),
            kind: PlotKind::Xy(vec![XyPanel {
                title: "adam | LoRA | init a".into(),
                x_label: "rank r".into(),
                y_label: "lr*".into(),
                y_axis: XyAxis::Decades,
                point_label: "lr*".into(),
                points: vec![(2.0, 1e-2, 5e-3, 2e-2), (4.0, 3e-3, 2e-3, 5e-3)],
                line: Some((
                    "law".into(),
                    vec![(2.0, 1.1e-2), (4.0, 2.9e-3), (8.0, 8e-4)],
                )),
                edges: vec![EdgeMark {
                    x: 8.0,
                    y: 1e-4,
                    up: false,
                    what: "below the grid".into(),
                }],
            }]),
        };
        let f = draw(&p).expect("draws");
        let doc = roxmltree::Document::parse(&f.svg).expect("svg");
        let count = |tag: &str| doc.descendants().filter(|n| n.has_tag_name(tag)).count();
        assert_eq!(count("circle"), 2 + 1, "two points and the legend's dot");
        assert_eq!(count("polygon"), 1 + 1, "one edge mark and the legend's");
        let texts = svg_texts(&f.svg);
        let numeric: Vec<&String> = texts.iter().filter(|t| t.parse::<f64>().is_ok()).collect();
        let mut unique = numeric.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            numeric.len(),
            "duplicate tick labels: {numeric:?}"
        );
        for t in ["2", "4", "8", "1e-4", "0.001", "0.01"] {
            assert!(texts.iter().any(|x| x == t), "no tick {t}: {texts:?}");
        }
    }

    #[test]
    fn power_ticks_fall_back_within_one_power() {
        assert_eq!(
            power_ticks(1e-4, 2e1, 10.0),
            vec![1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1]
        );
        assert_eq!(power_ticks(1.5, 40.0, 2.0), vec![2.0, 4.0, 8.0, 16.0, 32.0]);
        assert_eq!(power_ticks(2.0, 3.0, 10.0), dense_log_ticks(2.0, 3.0));
        // Fewer than three decades: 1-2-5 (every decade included), or finer.
        assert_eq!(power_ticks(0.08, 3.0, 10.0), vec![0.1, 0.2, 0.5, 1.0, 2.0]);
        assert_eq!(
            dense_log_ticks(17.0, 65.0),
            vec![20.0, 30.0, 40.0, 50.0, 60.0]
        );
        assert!(power_ticks(1e-12, 1e12, 10.0).len() <= 8);
        assert_eq!(distinct_labels(vec![0.10001, 0.1, 0.2]), vec![0.10001, 0.2]);
        assert_eq!(value_ticks(vec![8.0, 2.0, 4.0, 2.0]), vec![2.0, 4.0, 8.0]);
    }

    #[test]
    fn colour_maps_are_in_range() {
        assert_eq!(diverging(0.0), RGBColor(255, 255, 255));
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(220, 200, 30));
    }
}
