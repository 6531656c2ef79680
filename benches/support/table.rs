//! The benchmark's one table: a row per figure, printed as compact Markdown, and the number
//! formats used in it.

use super::measure::{median, median_pct, CpuUse, STEAL};

#[derive(Clone, Debug, Default)]
pub struct Row {
    pub section: String,
    pub case: String,
    pub result: String,
    pub relay_cpu: String,
    pub load_cpu: String,
    /// Which process was at ~100 % of a core.
    pub saturated: String,
    /// CPU used meanwhile by processes that are not part of the benchmark (other users).
    pub others: String,
    /// Relay CPU-seconds per unit of work.
    pub cost: String,
    pub notes: String,
}

impl Row {
    pub fn new(section: &str, case: impl Into<String>) -> Row {
        Row { section: section.into(), case: case.into(), ..Row::default() }
    }

    /// Add `note` (if any) to the notes.
    pub fn note(mut self, note: Option<String>) -> Row {
        if let Some(n) = note {
            if !self.notes.is_empty() {
                self.notes += "; ";
            }
            self.notes += &n;
        }
        self
    }

    /// Fill the CPU columns from per-run CPU use: `relay` is the relay's name in `uses`, `load`
    /// the load processes/threads to show (with a label each); medians over the runs.
    pub fn cpu(mut self, uses: &[CpuUse], relay: &str, load: &[(&str, &str)]) -> Row {
        let r = median_pct(uses, relay);
        self.relay_cpu = format!("{r:.0}%");
        let loads: Vec<(String, f64)> =
            load.iter().map(|(name, label)| (label.to_string(), median_pct(uses, name))).collect();
        self.load_cpu = loads
            .iter()
            .filter(|(l, p)| !(l.starts_with("ksoftirqd") && *p < 3.0))
            .map(|(l, p)| format!("{l} {p:.0}%"))
            .collect::<Vec<_>>()
            .join(", ");
        let others = median(&uses.iter().map(CpuUse::others_pct).collect::<Vec<_>>());
        let steal = median_pct(uses, STEAL);
        self.others = format!("{others:.0}%");
        if steal >= 1.0 {
            self.others += &format!(" (+{steal:.0}% steal)");
        }
        let mut all = vec![("relay".to_string(), r)];
        all.extend(loads);
        let busy: Vec<&str> = all.iter().filter(|(_, p)| *p >= 85.0).map(|(l, _)| l.as_str()).collect();
        self.saturated = if busy.is_empty() {
            let (l, p) = all.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
            format!("none (max {l} {p:.0}%)")
        } else {
            busy.join(", ")
        };
        self
    }
}

pub fn print_table(title: &str, rows: &[Row]) {
    println!("{title}");
    println!();
    println!("| § | case | median | relay CPU | load CPU | ~100% | others | relay CPU-s | notes |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.section, r.case, r.result, r.relay_cpu, r.load_cpu, r.saturated, r.others, r.cost, r.notes
        );
    }
}

/// 1234567 → "1.23 M", 61234 → "61.2 k".
pub fn si(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.0} k", x / 1e3)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0} ")
    }
}

/// Milliseconds with 3 decimals (ping's resolution).
pub fn ms(x: f64) -> String {
    format!("{x:.3} ms")
}
