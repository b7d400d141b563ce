//! What a benchmark run found: printed as it goes, then written to
//! `bench/results.md` with the machine, kernel and date, and drawn as PNG
//! plots next to it; the headline figures also go to `results.json`,
//! each under a stable name with its unit and, where there is one, the
//! peer's value measured in the same run.

use std::{fmt::Write as _, path::Path};

use plotters::{coord::ranged1d::ValueFormatter, prelude::*};

use crate::machine;

/// Appends a line to a section (`writeln!` on a `String`).
macro_rules! outln {
    ($out:expr) => { $out.push('\n') };
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        writeln!($out, $($arg)*).expect("write to a String");
    }};
}
pub(crate) use outln;

/// The `p` quantile (0 to 1) of `sorted`, the nearest rank.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A count as figure names write it: `10k`, `100k`, `1m`.
pub fn count_name(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}m", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// A duration in milliseconds, as the tables print it.
pub fn ms(d: std::time::Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// One line of a plot.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Plot {
    /// File name under `bench/`.
    pub file: &'static str,
    pub title: String,
    pub x_label: &'static str,
    pub y_label: &'static str,
    pub log_y: bool,
    pub series: Vec<Series>,
}

/// One figure of `results.json`: a stable name (`load_1m_policies_s`),
/// its value and unit, and the peer's value in the same run, if any.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Figure {
    pub value: f64,
    pub unit: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<Peer>,
}

/// The same figure of the peer it is compared with (`nftables`, ...).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Peer {
    pub name: &'static str,
    pub value: f64,
}

#[derive(Default)]
pub struct Report {
    sections: Vec<String>,
    plots: Vec<Plot>,
    figures: std::collections::BTreeMap<String, Figure>,
}

impl Report {
    /// Prints a finished section and keeps it for results.md.
    pub fn section(&mut self, text: String) {
        print!("{text}");
        self.sections.push(text);
    }

    pub fn plot(&mut self, plot: Plot) {
        self.plots.push(plot);
    }

    /// Records a figure for `results.json` (a name used twice keeps the
    /// last value).
    pub fn figure(&mut self, name: impl Into<String>, value: f64, unit: &'static str) {
        self.figures.insert(name.into(), Figure { value: round(value), unit, peer: None });
    }

    /// Records a figure with the peer's value measured in the same run.
    pub fn figure_vs(
        &mut self,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
        peer: &'static str,
        peer_value: f64,
    ) {
        let peer = Some(Peer { name: peer, value: round(peer_value) });
        self.figures.insert(name.into(), Figure { value: round(value), unit, peer });
    }

    /// Writes `dir/results.md` and the plots.
    pub fn write(&self, dir: &Path, quick: bool) {
        std::fs::create_dir_all(dir).expect("bench directory");
        register_font();
        let mut md = String::from("# Benchmark results\n\n");
        let _ = writeln!(
            md,
            "Written by `cargo xtask bench{}` on {}: {} ({} CPUs), kernel {}.\n\nEvery figure is measured in this run; ratios compare against a baseline measured in the same run on the same machine. Absolute numbers depend on the machine and its neighbours; the ratios are the point.\n",
            if quick { " --quick" } else { "" },
            date(),
            machine::cpu_model(),
            machine::cpus(),
            machine::kernel(),
        );
        for plot in &self.plots {
            match draw(dir, plot) {
                Ok(()) => {
                    let _ = writeln!(md, "![{}]({})\n", plot.title, plot.file);
                }
                Err(e) => eprintln!("cannot draw {}: {e}", plot.file),
            }
        }
        for section in &self.sections {
            md.push_str(section);
        }
        let path = dir.join("results.md");
        std::fs::write(&path, md).expect("write results.md");
        let json = serde_json::json!({
            "written": date(),
            "command": format!("cargo xtask bench{}", if quick { " --quick" } else { "" }),
            "machine": {
                "cpu": machine::cpu_model(),
                "cpus": machine::cpus(),
                "kernel": machine::kernel(),
            },
            "figures": self.figures,
        });
        let json_path = dir.join("results.json");
        let text = serde_json::to_string_pretty(&json).expect("figures as JSON");
        std::fs::write(&json_path, text + "\n").expect("write results.json");
        println!(
            "\nwrote {}, {} ({} figures) and {} plots",
            path.display(),
            json_path.display(),
            self.figures.len(),
            self.plots.len()
        );
    }
}

/// Three decimals: what the measurements can tell apart.
fn round(value: f64) -> f64 {
    (value * 1e3).round() / 1e3
}

fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// plotters draws text with a font registered by name (the Debian package
/// fonts-dejavu-core, installed by `cargo xtask setup`).
fn register_font() {
    match std::fs::read(FONT) {
        Ok(bytes) => {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_err() {
                eprintln!("cannot use the font {FONT}");
            }
        }
        Err(e) => eprintln!("no font at {FONT} ({e}): plots will lack text"),
    }
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
];

/// A line plot, x on a log scale (policy counts), y linear or log.
fn draw(dir: &Path, plot: &Plot) -> Result<(), Box<dyn std::error::Error>> {
    let path = dir.join(plot.file);
    let root = BitMapBackend::new(&path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let points = plot.series.iter().flat_map(|s| s.points.iter());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if x_min > x_max {
        return Err("no points".into());
    }
    let x_range = (x_min / 1.5)..(x_max * 1.5);
    let mut chart = ChartBuilder::on(&root);
    chart
        .caption(&plot.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80);
    if plot.log_y {
        let y_range = (y_min / 2.0).max(f64::MIN_POSITIVE)..(y_max * 6.0);
        let mut chart = chart.build_cartesian_2d(x_range.log_scale(), y_range.log_scale())?;
        lines(&mut chart, plot)?;
    } else {
        // Headroom above the lines for the legend.
        let y_range = 0.0..(y_max * 1.7);
        let mut chart = chart.build_cartesian_2d(x_range.log_scale(), y_range)?;
        lines(&mut chart, plot)?;
    }
    root.present()?;
    Ok(())
}

fn lines<'a, X, Y>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
    plot: &Plot,
) -> Result<(), Box<dyn std::error::Error>>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc(plot.x_label)
        .y_desc(plot.y_label)
        .x_label_formatter(&|x| human(*x))
        .y_label_formatter(&|y| human(*y))
        .label_style(("sans-serif", 15))
        .max_light_lines(2)
        .draw()?;
    for (i, s) in plot.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))?
            .label(&s.label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

/// 1000 → "1k", 2500000 → "2.5M", 0.5 → "0.5".
pub fn human(v: f64) -> String {
    let (scaled, unit) = match v.abs() {
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let text = if (scaled - scaled.round()).abs() < 1e-9 || scaled.abs() >= 10.0 {
        format!("{scaled:.0}")
    } else {
        format!("{scaled:.1}")
    };
    format!("{text}{unit}")
}
