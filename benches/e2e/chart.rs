//! The benchmark's chart: panels of bars (median, with a whisker from min to max) beside their
//! targets, written as plain SVG (text is left to the viewer's fonts, so nothing is needed to draw it).
//!
//! Written here rather than with a plotting crate (plotters): the chart is a few dozen rectangles,
//! lines and labels per panel, and writing them directly keeps the committed SVG small and the same
//! byte for byte for the same figures, so a change in `docs/bench` shows as a change in the numbers
//! only, with no drawing backend or font stack in the build.

use std::fmt::Write;

use crate::Stats;

/// One bar: its label (short), its figure, and its colour.
pub struct Bar {
    pub label: String,
    pub stats: Stats,
    pub colour: &'static str,
}

impl Bar {
    pub fn new(label: impl Into<String>, stats: Stats, colour: &'static str) -> Bar {
        Bar {
            label: label.into(),
            stats,
            colour,
        }
    }
}

/// One panel of bars.
pub struct Panel {
    pub title: String,
    pub unit: String,
    pub bars: Vec<Bar>,
    /// A target drawn as a dashed line, with its label.
    pub target: Option<(f64, String)>,
    /// A logarithmic y axis (for figures that span orders of magnitude).
    pub log: bool,
}

pub const BLUE: &str = "#3b6fb6";
pub const GREEN: &str = "#3f9b5b";
pub const GREY: &str = "#8c8c8c";
pub const ORANGE: &str = "#d9822b";

const PANEL_W: f64 = 420.0;
const PANEL_H: f64 = 300.0;
const COLUMNS: usize = 3;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A readable number: 1.2M, 15.1k, 0.73, 12.
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The y scale of a panel: value to pixel offset from the plot's bottom, and the ticks.
struct Scale {
    lo: f64,
    hi: f64,
    log: bool,
    height: f64,
}

impl Scale {
    fn new(panel: &Panel, height: f64) -> Scale {
        let mut values: Vec<f64> = panel
            .bars
            .iter()
            .flat_map(|b| [b.stats.min, b.stats.median, b.stats.max])
            .filter(|v| v.is_finite())
            .collect();
        values.extend(panel.target.as_ref().map(|t| t.0));
        let max = values.iter().copied().fold(0.0, f64::max).max(1e-9);
        if panel.log {
            let min = values
                .iter()
                .copied()
                .filter(|v| *v > 0.0)
                .fold(max, f64::min);
            // A decade below the smallest figure when it sits right on a decade line.
            let mut lo = 10f64.powf(min.log10().floor());
            if min / lo < 1.5 {
                lo /= 10.0;
            }
            Scale {
                lo,
                hi: 10f64.powf(max.log10().ceil()),
                log: true,
                height,
            }
        } else {
            Scale {
                lo: 0.0,
                hi: max * 1.15,
                log: false,
                height,
            }
        }
    }

    fn y(&self, v: f64) -> f64 {
        let f = if self.log {
            (v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        self.height * f.clamp(0.0, 1.0)
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let mut t = Vec::new();
            let mut v = self.lo;
            while v <= self.hi * 1.0001 {
                t.push(v);
                v *= 10.0;
            }
            t
        } else {
            let step = nice_step(self.hi / 5.0);
            (0..=((self.hi / step) as usize))
                .map(|i| i as f64 * step)
                .collect()
        }
    }
}

fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    let f = raw / p;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * p
}

fn panel_svg(out: &mut String, panel: &Panel, x0: f64, y0: f64) {
    let (left, right, top, bottom) = (58.0, 12.0, 34.0, 62.0);
    let plot_w = PANEL_W - left - right;
    let plot_h = PANEL_H - top - bottom;
    let scale = Scale::new(panel, plot_h);
    let base = y0 + top + plot_h;
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="14" font-weight="bold">{}</text>"#,
        x0 + 8.0,
        y0 + 20.0,
        escape(&panel.title)
    );
    for tick in scale.ticks() {
        let y = base - scale.y(tick);
        let _ = writeln!(
            out,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
            x0 + left,
            x0 + left + plot_w,
            x0 + left - 4.0,
            y + 3.0,
            short(tick)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="10" transform="rotate(-90 {:.1} {:.1})" text-anchor="middle">{}</text>"#,
        x0 + 12.0,
        y0 + top + plot_h / 2.0,
        x0 + 12.0,
        y0 + top + plot_h / 2.0,
        escape(&panel.unit)
    );
    let n = panel.bars.len().max(1) as f64;
    let slot = plot_w / n;
    for (i, bar) in panel.bars.iter().enumerate() {
        let cx = x0 + left + slot * (i as f64 + 0.5);
        let w = (slot * 0.62).min(48.0);
        let h = scale.y(bar.stats.median);
        let _ = writeln!(
            out,
            r#"<rect x="{:.1}" y="{:.1}" width="{w:.1}" height="{h:.1}" fill="{}"/>"#,
            cx - w / 2.0,
            base - h,
            bar.colour
        );
        let (lo, hi) = (base - scale.y(bar.stats.min), base - scale.y(bar.stats.max));
        let _ = writeln!(
            out,
            r##"<path d="M{:.1} {lo:.1}V{hi:.1}M{:.1} {lo:.1}H{:.1}M{:.1} {hi:.1}H{:.1}" stroke="#222" fill="none"/>"##,
            cx,
            cx - 5.0,
            cx + 5.0,
            cx - 5.0,
            cx + 5.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{cx:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
            hi - 4.0,
            short(bar.stats.median)
        );
        for (k, line) in bar.label.split('\n').enumerate() {
            let _ = writeln!(
                out,
                r#"<text x="{cx:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                base + 14.0 + 12.0 * k as f64,
                escape(line)
            );
        }
    }
    if let Some((value, label)) = &panel.target {
        let y = base - scale.y(*value);
        // A white halo keeps the label readable where it crosses a bar.
        let _ = writeln!(
            out,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#c0392b" stroke-dasharray="5 4"/><text x="{:.1}" y="{:.1}" font-size="10" fill="#c0392b" stroke="white" stroke-width="3" paint-order="stroke">{}</text>"##,
            x0 + left,
            x0 + left + plot_w,
            x0 + left + 4.0,
            y - 4.0,
            escape(label)
        );
    }
    let _ = writeln!(
        out,
        r##"<line x1="{:.1}" y1="{base:.1}" x2="{:.1}" y2="{base:.1}" stroke="#222"/>"##,
        x0 + left,
        x0 + left + plot_w
    );
}

/// The whole chart: panels three to a row, with a title and a footnote.
pub fn svg(title: &str, footnote: &str, panels: &[Panel]) -> String {
    let rows = panels.len().div_ceil(COLUMNS).max(1);
    let width = PANEL_W * COLUMNS as f64;
    let height = PANEL_H * rows as f64 + 56.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="24" font-size="16" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        let (col, row) = (i % COLUMNS, i / COLUMNS);
        panel_svg(
            &mut out,
            panel,
            col as f64 * PANEL_W,
            32.0 + row as f64 * PANEL_H,
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="10" y="{:.1}" font-size="10" fill="#555">{}</text>"##,
        height - 8.0,
        escape(footnote)
    );
    out.push_str("</svg>\n");
    out
}
