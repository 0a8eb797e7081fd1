//! Hand-written inline SVG charts: [`bar_chart`], [`line_chart`] and [`stacked_bars`]. Each
//! returns one `<svg>` element sized by its `viewBox` (it scales to the page width), with every
//! label escaped. No external fonts, images or scripts: the page must stay self-contained.
//!
//! A hand-written module instead of `plotters`: three small chart kinds need about 250 lines,
//! while plotters' SVG backend would add a dependency tree to the library and emit text styles
//! we would post-process anyway.

use std::fmt::Write;

use super::html::escape;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 50.0;

/// Series colours (colour-blind-safe Okabe–Ito order).
pub const PALETTE: [&str; 7] = [
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#555555",
];

/// A number for an axis or a label: short, no trailing zeros.
pub fn format_number(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let a = x.abs();
    let s = if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 0.01 || a == 0.0 {
        format!("{x:.3}")
    } else {
        format!("{x:.1e}")
    };
    if s.contains('.') && !s.contains('e') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// About five round tick values covering `[lo, hi]`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).abs().max(1e-12);
    let raw = span / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| span / s <= 6.0)
        .unwrap_or(raw);
    let first = (lo / step).ceil() * step;
    (0..20)
        .map(|i| first + i as f64 * step)
        .take_while(|v| *v <= hi + step * 1e-6)
        .collect()
}

fn open_svg(out: &mut String, title: &str) {
    let _ = write!(
        out,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{t}"><title>{t}</title><text class="chart-title" x="{x}" y="18" text-anchor="middle">{t}</text>"#,
        t = escape(title),
        x = WIDTH / 2.0
    );
}

fn axes(out: &mut String, y_lo: f64, y_hi: f64, y_label: &str) {
    let plot_h = HEIGHT - TOP - BOTTOM;
    for tick in ticks(y_lo, y_hi) {
        let y = TOP + plot_h * (1.0 - (tick - y_lo) / (y_hi - y_lo).max(1e-12));
        let _ = write!(
            out,
            r#"<line class="grid" x1="{LEFT}" y1="{y:.1}" x2="{x2}" y2="{y:.1}"/><text class="tick" x="{tx}" y="{ty:.1}" text-anchor="end">{label}</text>"#,
            x2 = WIDTH - RIGHT,
            tx = LEFT - 6.0,
            ty = y + 4.0,
            label = escape(&format_number(tick))
        );
    }
    let _ = write!(
        out,
        r#"<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b}"/><line class="axis" x1="{LEFT}" y1="{b}" x2="{r}" y2="{b}"/><text class="axis-label" x="12" y="{my}" text-anchor="middle" transform="rotate(-90 12 {my})">{label}</text>"#,
        b = HEIGHT - BOTTOM,
        r = WIDTH - RIGHT,
        my = TOP + plot_h / 2.0,
        label = escape(y_label)
    );
}

/// Vertical bars with their values written above them; `y_max` fixes the top of the axis
/// (e.g. 1 for accuracies).
pub fn bar_chart(title: &str, y_label: &str, bars: &[(String, f64)], y_max: Option<f64>) -> String {
    let mut out = String::new();
    open_svg(&mut out, title);
    let top = y_max
        .unwrap_or_else(|| bars.iter().map(|b| b.1).fold(0.0, f64::max) * 1.1)
        .max(1e-12);
    axes(&mut out, 0.0, top, y_label);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let slot = plot_w / bars.len().max(1) as f64;
    for (i, (label, value)) in bars.iter().enumerate() {
        let v = if value.is_finite() {
            value.clamp(0.0, top)
        } else {
            0.0
        };
        let h = plot_h * v / top;
        let x = LEFT + slot * i as f64 + slot * 0.2;
        let y = TOP + plot_h - h;
        let _ = write!(
            out,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{c}"><title>{l}: {v}</title></rect><text class="value" x="{cx:.1}" y="{vy:.1}" text-anchor="middle">{v}</text><text class="tick" x="{cx:.1}" y="{ly:.1}" text-anchor="middle">{l}</text>"#,
            w = slot * 0.6,
            c = PALETTE[i % PALETTE.len()],
            l = escape(label),
            v = escape(&format_number(*value)),
            cx = x + slot * 0.3,
            vy = y - 4.0,
            ly = HEIGHT - BOTTOM + 16.0
        );
    }
    out.push_str("</svg>");
    out
}

/// Lines of `(x, y)` points on shared axes, with a legend; non-finite points are skipped.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let mut out = String::new();
    open_svg(&mut out, title);
    let points = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in points {
        (x_lo, x_hi, y_lo, y_hi) = (x_lo.min(x), x_hi.max(x), y_lo.min(y), y_hi.max(y));
    }
    if !x_lo.is_finite() {
        (x_lo, x_hi, y_lo, y_hi) = (0.0, 1.0, 0.0, 1.0);
    }
    if x_hi - x_lo < 1e-12 {
        x_hi = x_lo + 1.0;
    }
    // A flat series (one point, or a constant) still gets a readable axis around its value.
    let pad = if y_hi - y_lo < 1e-12 {
        (y_hi.abs() * 0.1).max(1e-6)
    } else {
        (y_hi - y_lo) * 0.05
    };
    let (y_lo, y_hi) = (y_lo - pad, y_hi + pad);
    axes(&mut out, y_lo, y_hi, y_label);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let sx = |x: f64| LEFT + plot_w * (x - x_lo) / (x_hi - x_lo);
    let sy = |y: f64| TOP + plot_h * (1.0 - (y - y_lo) / (y_hi - y_lo));
    for tick in ticks(x_lo, x_hi) {
        let _ = write!(
            out,
            r#"<text class="tick" x="{x:.1}" y="{y}" text-anchor="middle">{l}</text>"#,
            x = sx(tick),
            y = HEIGHT - BOTTOM + 16.0,
            l = escape(&format_number(tick))
        );
    }
    let _ = write!(
        out,
        r#"<text class="axis-label" x="{x}" y="{y}" text-anchor="middle">{l}</text>"#,
        x = LEFT + plot_w / 2.0,
        y = HEIGHT - 10.0,
        l = escape(x_label)
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        if path.len() == 1 {
            let _ = write!(
                out,
                r#"<circle cx="{}" r="3" fill="{colour}"/>"#,
                path[0].replace(',', "\" cy=\"")
            );
        } else {
            let _ = write!(
                out,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
                path.join(" ")
            );
        }
        if series.len() < 2 {
            continue;
        }
        let ly = TOP + 4.0 + 14.0 * i as f64;
        let lx = WIDTH - RIGHT - 150.0;
        let _ = write!(
            out,
            r#"<rect x="{lx}" y="{ry}" width="10" height="10" fill="{colour}"/><text class="legend" x="{tx}" y="{ty}">{n}</text>"#,
            ry = ly,
            tx = lx + 14.0,
            ty = ly + 9.0,
            n = escape(name)
        );
    }
    out.push_str("</svg>");
    out
}

/// Horizontal 100% bars: one per row, split into `categories` (name, colour) by the row's shares
/// (normalised to sum to 1), with a legend.
pub fn stacked_bars(
    title: &str,
    categories: &[(&str, &str)],
    rows: &[(String, Vec<f64>)],
) -> String {
    let height = TOP + 30.0 + 34.0 * rows.len() as f64 + 20.0;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{t}"><title>{t}</title><text class="chart-title" x="{x}" y="18" text-anchor="middle">{t}</text>"#,
        t = escape(title),
        x = WIDTH / 2.0
    );
    let (left, bar_w) = (130.0, WIDTH - 130.0 - RIGHT);
    for (j, (name, colour)) in categories.iter().enumerate() {
        let x = left + j as f64 * 100.0;
        let _ = write!(
            out,
            r#"<rect x="{x}" y="{y}" width="10" height="10" fill="{colour}"/><text class="legend" x="{tx}" y="{ty}">{n}</text>"#,
            y = TOP,
            tx = x + 14.0,
            ty = TOP + 9.0,
            n = escape(name)
        );
    }
    for (i, (label, values)) in rows.iter().enumerate() {
        let y = TOP + 24.0 + 34.0 * i as f64;
        let total: f64 = values.iter().filter(|v| v.is_finite() && **v > 0.0).sum();
        let _ = write!(
            out,
            r#"<text class="tick" x="{x}" y="{ty}" text-anchor="end">{l}</text>"#,
            x = left - 8.0,
            ty = y + 16.0,
            l = escape(label)
        );
        let mut x = left;
        for (j, value) in values.iter().enumerate() {
            let share = if total > 0.0 && value.is_finite() && *value > 0.0 {
                value / total
            } else {
                0.0
            };
            let w = bar_w * share;
            if w <= 0.0 {
                continue;
            }
            let (name, colour) = categories.get(j).copied().unwrap_or(("other", "#999999"));
            let _ = write!(
                out,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="24" fill="{colour}"><title>{n}: {p:.1}%</title></rect>"#,
                n = escape(name),
                p = share * 100.0
            );
            if w > 34.0 {
                let _ = write!(
                    out,
                    r#"<text class="inbar" x="{cx:.1}" y="{ty:.1}" text-anchor="middle">{p:.0}%</text>"#,
                    cx = x + w / 2.0,
                    ty = y + 16.0,
                    p = share * 100.0
                );
            }
            x += w;
        }
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            ticks(0.0, 1.0),
            [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        let t = ticks(3.2, 97.0);
        assert!(
            t.first().is_some_and(|&v| v >= 3.2) && t.len() >= 4,
            "{t:?}"
        );
        assert_eq!(format_number(0.5), "0.5");
        assert_eq!(format_number(12345.6), "12346");
        assert_eq!(format_number(0.0001234), "1.2e-4");
    }

    #[test]
    fn labels_are_escaped() {
        let svg = bar_chart("a<b", "y", &[("<x>".into(), 0.5)], Some(1.0));
        assert!(!svg.contains("<x>") && svg.contains("&lt;x&gt;") && svg.contains("a&lt;b"));
        let svg = line_chart(
            "t",
            "x",
            "y",
            &[
                ("s&".into(), vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 0.5)]),
                ("two".into(), vec![(1.0, 2.0)]),
            ],
        );
        assert!(svg.contains("s&amp;") && svg.contains("<polyline"));
        let svg = stacked_bars(
            "t",
            &[("a", "#000"), ("b", "#fff")],
            &[("r".into(), vec![1.0, 3.0])],
        );
        assert!(svg.contains("25.0%") && svg.contains("75.0%"), "{svg}");
    }

    #[test]
    fn a_single_point_gets_distinct_y_ticks() {
        let svg = line_chart("t", "x", "y", &[("one".into(), vec![(1.0, 2.0)])]);
        let labels: std::collections::BTreeSet<&str> = svg
            .split(r#"text-anchor="end">"#)
            .skip(1)
            .filter_map(|s| s.split('<').next())
            .collect();
        assert!(labels.len() >= 3, "{labels:?}");
        assert!(svg.contains("<circle"));
    }
}
