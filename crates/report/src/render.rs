//! HTML and Markdown from two small templates (`templates/`) filled by `Serialize` structs.
//!
//! The HTML template is auto-escaped (minijinja escapes every `{{ }}` in a `.html`
//! template); the Markdown template escapes every text field with the `md` filter.
use crate::analyse::Analysis;
use crate::figures::Figure;
use crate::ReportError;
use minijinja::{Environment, Value};
use serde::Serialize;
use std::collections::BTreeMap;

const INDEX: &str = include_str!("../templates/index.html");
const MARKDOWN: &str = include_str!("../templates/report.md");

/// The derivations the report links to (`proofs/` in the repository).
pub const PROOFS: [(&str, &str); 8] = [
    ("README.md", "notation and index of the derivations"),
    (
        "theorem-3.2-sgd.md",
        "Theorem 3.2 under SGD: moments scale as r^(m(1-2 beta)); rsLoRA is rank-flat",
    ),
    (
        "adam.md",
        "the Adam counterpart in the sign-like regime: r^(m(1-beta)); standard LoRA is rank-flat",
    ),
    (
        "first-step.md",
        "the exact second moment after one SGD step",
    ),
    (
        "finite-rank.md",
        "finite-rank and incoherent-input corrections: the two-term law and the predicted slopes",
    ),
    (
        "exact-law.md",
        "the exact first-step law of every moment order, given the data: the law rows",
    ),
    (
        "lr-transfer.md",
        "the exponent of the optimal learning rate across ranks: the one-step and long-horizon laws, the published claims",
    ),
    (
        "verdicts.md",
        "the verdict rule: three outcomes from 90% intervals, derived bands, rivals, Benjamini-Hochberg",
    ),
];

/// The text of every file of [`PROOFS`], built in, so that a report written outside the
/// repository carries its own copy and its links resolve wherever it is read (the proofs
/// link only to each other).
pub const PROOF_TEXTS: [(&str, &str); 8] = [
    ("README.md", include_str!("../../../proofs/README.md")),
    (
        "theorem-3.2-sgd.md",
        include_str!("../../../proofs/theorem-3.2-sgd.md"),
    ),
    ("adam.md", include_str!("../../../proofs/adam.md")),
    (
        "first-step.md",
        include_str!("../../../proofs/first-step.md"),
    ),
    (
        "finite-rank.md",
        include_str!("../../../proofs/finite-rank.md"),
    ),
    ("exact-law.md", include_str!("../../../proofs/exact-law.md")),
    (
        "lr-transfer.md",
        include_str!("../../../proofs/lr-transfer.md"),
    ),
    ("verdicts.md", include_str!("../../../proofs/verdicts.md")),
];

/// Most training rows shown inline (the rest are in exponents.csv).
const MAX_INLINE_ROWS: usize = 1500;

/// What the page says about the report itself.
#[derive(Debug, Clone, Serialize)]
pub struct PageMeta {
    /// Page title.
    pub title: String,
    /// Generation time (RFC 3339).
    pub generated: String,
    /// "rankstab 0.1.0".
    pub tool: String,
    /// Revision of the tool, when known.
    pub git_revision: String,
    /// The directories given, as text.
    pub inputs: String,
    /// Prefix of links to proofs/ files (relative to the report, ends with '/').
    pub proofs_href: String,
    /// Where proofs/ is, in words.
    pub proofs_where: String,
}

#[derive(Serialize)]
struct FigureView {
    name: String,
    title: String,
    caption: String,
    /// The SVG document, inline in the HTML (vector); empty for Markdown.
    svg: String,
    png_file: String,
    svg_file: String,
    width: u32,
    height: u32,
}

#[derive(Serialize)]
struct ProofView {
    file: &'static str,
    what: &'static str,
}

#[derive(Serialize)]
struct Page<'a> {
    #[serde(flatten)]
    meta: &'a PageMeta,
    analysis: &'a Analysis,
    figures: BTreeMap<String, FigureView>,
    proofs: Vec<ProofView>,
    train_law_choice: &'static str,
    max_inline_rows: usize,
}

/// How training fits are judged, in one paragraph (also in `analyse`'s docs).
pub const TRAIN_LAW_CHOICE: &str = "a training fit's prediction comes only from the exact first-step law that each run \
computed from its own step-0 data (its law rows: E|fwd|^m after one step, in expectation over the adapter's random init \
given that run's batch). It is tested at step 1 on the paired difference of slopes, measured minus law seed by seed, \
against a band around 0; other statistics and windows, and runs written before the trainer recorded law rows, have no \
prediction (the law column says why). Outcomes come from 90% intervals, with the Benjamini-Hochberg procedure over \
two families of the report's training fits: the primary one (each module's fit on the mean over its layers, or on its \
one layer), which the headline counts, and the per-layer fits, many and noisier, judged apart so that they do not \
dilute the primary fits' power. Adding or removing training runs can change a borderline outcome, adding theory runs \
changes none. Each fit is also set against the rival laws (the paper's coherent limit, the \
incoherent limit, the other optimizer's law, slope 0), and its stability comes from its interval against the \
resolution band around 0. A fit is judged only with >= 3 seeds (common to every rank) and >= 5 ranks whose largest \
reaches d/8 of the smallest adapted module of its model; otherwise its outcome is inconclusive and its verdict undetermined, and the training notes \
say which cells lacked what. Exponents are fitted per module and layer and on the mean over layers, within step \
windows (step 0, step 1, then equal-count chunks of the later recorded steps). A run still running is used with the \
rows it has so far, a diverged run with its rows before the divergence; both are named in the training notes and the \
provenance table.";

/// Escapes text for HTML (what the template engine does to every field, for callers that
/// build HTML by hand).
///
/// ```
/// assert_eq!(rankstab_report::render::escape_html("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#x27;");
/// ```
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes text for a Markdown table cell or paragraph: no raw HTML, no cell breaks, no
/// emphasis or link syntax taken from data.
///
/// ```
/// assert_eq!(rankstab_report::render::escape_md("a|b <i>*x*</i>\n[y]"), "a\\|b &lt;i&gt;\\*x\\*&lt;/i&gt; \\[y\\]");
/// ```
pub fn escape_md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\n' | '\r' => out.push(' '),
            '|' | '*' | '_' | '`' | '[' | ']' | '\\' | '#' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

fn as_f64(v: &Value) -> Option<f64> {
    if v.is_none() || v.is_undefined() {
        return None;
    }
    f64::try_from(v.clone()).ok()
}

/// A slope or other small number: signed, two decimals; missing or NaN as "-".
fn num(v: Value) -> String {
    match as_f64(&v) {
        Some(x) if x.is_finite() => format!("{x:+.2}"),
        Some(x) if x.is_nan() => "NaN".into(),
        Some(x) => format!("{x}"),
        None => "-".into(),
    }
}

/// A positive quantity such as a learning rate or a loss: three significant digits, plain
/// between 1e-3 and 1e4, scientific outside; missing as "-".
fn sig3(v: Value) -> String {
    match as_f64(&v) {
        Some(0.0) => "0".into(),
        Some(x) if x.is_finite() && (1e-3..1e4).contains(&x.abs()) => {
            let decimals = (2 - x.abs().log10().floor() as i32).max(0) as usize;
            format!("{x:.decimals$}")
        }
        Some(x) if x.is_finite() => format!("{x:.2e}"),
        Some(x) => format!("{x}"),
        None => "-".into(),
    }
}

fn sci(v: Value) -> String {
    match as_f64(&v) {
        Some(x) => format!("{x:.4e}"),
        None => "-".into(),
    }
}

/// A band's half-width: "±0.08"; missing as "-".
fn pm(v: Value) -> String {
    match as_f64(&v) {
        Some(x) if x.is_finite() => format!("\u{b1}{x:.2}"),
        _ => "-".into(),
    }
}

fn yesno(v: Value) -> String {
    if v.is_none() || v.is_undefined() {
        "-".into()
    } else if v.is_true() {
        "yes".into()
    } else {
        "no".into()
    }
}

/// The CSS class of a yes/no cell: as [`yesno`], but nothing when missing.
fn yesno_class(v: Value) -> String {
    if v.is_none() || v.is_undefined() {
        String::new()
    } else {
        yesno(v)
    }
}

fn md(v: Value) -> String {
    if v.is_none() || v.is_undefined() {
        return String::new();
    }
    escape_md(&v.as_str().map_or_else(|| v.to_string(), str::to_string))
}

fn env() -> Result<Environment<'static>, ReportError> {
    let mut env = Environment::new();
    env.add_filter("num", num);
    env.add_filter("sci", sci);
    env.add_filter("sig3", sig3);
    env.add_filter("pm", pm);
    env.add_filter("yesno", yesno);
    env.add_filter("yesno_class", yesno_class);
    env.add_filter("md", md);
    env.add_template("index.html", INDEX)
        .map_err(|source| ReportError::Template {
            name: "index.html",
            source,
        })?;
    env.add_template("report.md", MARKDOWN)
        .map_err(|source| ReportError::Template {
            name: "report.md",
            source,
        })?;
    Ok(env)
}

fn page<'a>(
    meta: &'a PageMeta,
    analysis: &'a Analysis,
    figures: &[Figure],
    inline: bool,
) -> Page<'a> {
    let figures = figures
        .iter()
        .map(|f| {
            let svg = if inline {
                inline_svg(&f.svg)
            } else {
                String::new()
            };
            let view = FigureView {
                name: f.name.clone(),
                title: f.title.clone(),
                caption: f.caption.clone(),
                svg,
                png_file: format!("figures/{}.png", f.name),
                svg_file: format!("figures/{}.svg", f.name),
                width: f.size.0,
                height: f.size.1,
            };
            (f.name.clone(), view)
        })
        .collect();
    Page {
        meta,
        analysis,
        figures,
        proofs: PROOFS
            .iter()
            .map(|&(file, what)| ProofView { file, what })
            .collect(),
        train_law_choice: TRAIN_LAW_CHOICE,
        max_inline_rows: MAX_INLINE_ROWS,
    }
}

/// An SVG document as an element of the page: without the XML declaration.
fn inline_svg(svg: &str) -> String {
    let start = svg.find("<svg").unwrap_or(0);
    svg[start..].to_string()
}

/// The self-contained `index.html`: figures inline as SVG (vector).
///
/// # Errors
/// [`ReportError::Template`] if the template fails.
pub fn html(
    meta: &PageMeta,
    analysis: &Analysis,
    figures: &[Figure],
) -> Result<String, ReportError> {
    render("index.html", page(meta, analysis, figures, true))
}

/// `report.md`: figures referenced as files under `figures/`.
///
/// # Errors
/// [`ReportError::Template`] if the template fails.
pub fn markdown(
    meta: &PageMeta,
    analysis: &Analysis,
    figures: &[Figure],
) -> Result<String, ReportError> {
    render("report.md", page(meta, analysis, figures, false))
}

fn render(name: &'static str, page: Page<'_>) -> Result<String, ReportError> {
    let template_err = |source| ReportError::Template { name, source };
    env()?
        .get_template(name)
        .and_then(|t| t.render(page))
        .map_err(template_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_format_missing_values() {
        assert_eq!(num(Value::from(())), "-");
        assert_eq!(num(Value::from(-0.254)), "-0.25");
        assert_eq!(num(Value::from(f64::NAN)), "NaN");
        assert_eq!(yesno(Value::from(true)), "yes");
        assert_eq!(yesno(Value::from(())), "-");
        assert_eq!(pm(Value::from(0.0845)), "\u{b1}0.08");
        assert_eq!(pm(Value::from(())), "-");
        assert_eq!(sig3(Value::from(0.031_62)), "0.0316");
        assert_eq!(sig3(Value::from(12.345)), "12.3");
        assert_eq!(sig3(Value::from(2.5e-5)), "2.50e-5");
        assert_eq!(sig3(Value::from(())), "-");
    }

    #[test]
    fn built_in_proofs_are_the_linked_ones() {
        let linked: Vec<&str> = PROOFS.iter().map(|p| p.0).collect();
        let built_in: Vec<&str> = PROOF_TEXTS.iter().map(|p| p.0).collect();
        assert_eq!(linked, built_in);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proofs");
        let on_disk = std::fs::read_dir(&dir).expect("proofs/").count();
        assert_eq!(
            on_disk,
            PROOF_TEXTS.len(),
            "a file of proofs/ is not built in"
        );
    }

    #[test]
    fn every_linked_proof_exists() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proofs");
        for (file, _) in PROOFS {
            assert!(
                dir.join(file).is_file(),
                "proofs/{file} is linked from the report but missing"
            );
        }
    }
}
