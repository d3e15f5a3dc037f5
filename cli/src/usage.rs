//! `llmctl usage`: what the usage ledger holds for a window, as a table with totals and a
//! bar chart per hour or day (or as JSON or CSV for scripts).

use crate::fail::Fail;
use llmd_client::proto::methods::{civil_from_days, UsageBy, UsageResult, UsageTotals};
use llmd_client::Client;

/// `llmctl usage` arguments.
#[derive(clap::Args)]
pub struct UsageArgs {
    /// Start of the window: `24h`, `7d`, `90m`, `2w` or a UTC date `YYYY-MM-DD`.
    #[arg(long, default_value = "24h")]
    since: String,
    /// Rows by profile, agent, model or day.
    #[arg(long, value_enum, default_value_t = By::Profile)]
    by: By,
    /// Print the rows as CSV (with a header line); `--json` prints everything as JSON.
    #[arg(long)]
    csv: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum By {
    Profile,
    Agent,
    Model,
    Day,
    Member,
}

impl From<By> for UsageBy {
    fn from(b: By) -> UsageBy {
        match b {
            By::Profile => UsageBy::Profile,
            By::Agent => UsageBy::Agent,
            By::Model => UsageBy::Model,
            By::Day => UsageBy::Day,
            By::Member => UsageBy::Member,
        }
    }
}

/// Width of the longest bar, in terminal cells.
const BAR_CELLS: usize = 40;

/// Runs `llmctl usage`.
pub async fn run(client: &Client, args: UsageArgs, json: bool) -> Result<(), Fail> {
    let r = client.usage(Some(&args.since), args.by.into()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else if args.csv {
        print!("{}", csv(&r));
    } else {
        print!("{}", table(&r));
    }
    Ok(())
}

fn heading(by: UsageBy) -> &'static str {
    match by {
        UsageBy::Profile => "PROFILE",
        UsageBy::Agent => "AGENT",
        UsageBy::Model => "MODEL",
        UsageBy::Day => "DAY",
        UsageBy::Member => "MEMBER",
    }
}

/// CSV: one line per row, then none for the totals (a script sums them itself).
pub fn csv(r: &UsageResult) -> String {
    let mut out = format!(
        "{},requests,errors,input_tokens,output_tokens,cache_read_tokens,cache_write_tokens\n",
        heading(r.by).to_ascii_lowercase()
    );
    for row in &r.rows {
        let t = &row.totals;
        out.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            csv_field(&row.key),
            t.requests,
            t.errors,
            t.input_tokens,
            t.output_tokens,
            t.cache_read_tokens,
            t.cache_write_tokens
        ));
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// `1234` → `1.2k`, `5600000` → `5.6M`.
fn human(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.1}G", n as f64 / 1e9),
    }
}

fn date(secs: u64) -> (i64, i64, i64) {
    civil_from_days(i64::try_from(secs / 86_400).unwrap_or(0))
}

fn bucket_label(start: u64, hourly: bool) -> String {
    let (y, m, d) = date(start);
    if hourly {
        format!("{m:02}-{d:02} {:02}:00", start % 86_400 / 3_600)
    } else {
        format!("{y:04}-{m:02}-{d:02}")
    }
}

/// A bar of `value` out of `max`, in eighths of a cell.
fn bar(value: u64, max: u64) -> String {
    const EIGHTHS: [char; 8] = ['▏', '▎', '▍', '▌', '▋', '▊', '▉', '█'];
    if max == 0 || value == 0 {
        return String::new();
    }
    let eighths = (value as u128 * (BAR_CELLS as u128) * 8 / max as u128).max(1) as usize;
    let mut s = "█".repeat(eighths / 8);
    if eighths % 8 > 0 {
        s.push(EIGHTHS[eighths % 8 - 1]);
    }
    s
}

/// The table, its totals, the chart and the `token` counts.
pub fn table(r: &UsageResult) -> String {
    let (y, m, d) = date(r.since);
    let mut out = format!(
        "Usage since {y:04}-{m:02}-{d:02} {:02}:{:02} UTC{}\n\n",
        r.since % 86_400 / 3_600,
        r.since % 3_600 / 60,
        if r.enabled {
            ""
        } else {
            " (recording is off: [usage] enabled = false)"
        }
    );
    let head = heading(r.by);
    let width = r
        .rows
        .iter()
        .map(|row| row.key.chars().count())
        .chain([head.len(), 5])
        .max()
        .unwrap_or(5)
        .min(48);
    let line = |key: &str, t: &UsageTotals| {
        format!(
            "{key:<width$}  {:>8}  {:>6}  {:>8}  {:>8}  {:>10}  {:>11}\n",
            t.requests,
            t.errors,
            human(t.input_tokens),
            human(t.output_tokens),
            human(t.cache_read_tokens),
            human(t.cache_write_tokens),
        )
    };
    out.push_str(&format!(
        "{head:<width$}  {:>8}  {:>6}  {:>8}  {:>8}  {:>10}  {:>11}\n",
        "REQUESTS", "ERRORS", "INPUT", "OUTPUT", "CACHE-READ", "CACHE-WRITE"
    ));
    for row in &r.rows {
        let key: String = row.key.chars().take(width).collect();
        out.push_str(&line(&key, &row.totals));
    }
    out.push_str(&line("TOTAL", &r.totals));
    if r.rows.is_empty() {
        out.push_str("\n(no requests recorded in this window)\n");
    }
    let hourly = r.bucket == "hour";
    let max = r.buckets.iter().map(|b| b.tokens).max().unwrap_or(0);
    if max > 0 {
        out.push_str(&format!(
            "\nTokens per {} (UTC)\n",
            if hourly { "hour" } else { "day" }
        ));
        // Hours or days before the first use say nothing: the chart starts at the first.
        for b in r.buckets.iter().skip_while(|b| b.tokens == 0) {
            out.push_str(&format!(
                "{}  {:>7}  {}\n",
                bucket_label(b.start, hourly),
                human(b.tokens),
                bar(b.tokens, max)
            ));
        }
    }
    if !r.token_calls.is_empty() {
        out.push_str("\n`token` calls (whole days)\n");
        for c in &r.token_calls {
            out.push_str(&format!(
                "{:<20}  {:<24}  {:>8}\n",
                c.profile, c.agent, c.calls
            ));
        }
    }
    if r.dropped > 0 {
        out.push_str(&format!(
            "\n{} request(s) were not recorded: the ledger's queue was full\n",
            r.dropped
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmd_client::proto::methods::{UsageBucket, UsageRow};

    fn result() -> UsageResult {
        let t = UsageTotals {
            requests: 2,
            errors: 0,
            input_tokens: 12_345,
            output_tokens: 7,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
        };
        UsageResult {
            since: 1_796_083_200,
            by: UsageBy::Agent,
            rows: vec![UsageRow {
                key: "a,b".into(),
                totals: t.clone(),
            }],
            totals: t,
            bucket: "hour".into(),
            buckets: vec![
                UsageBucket {
                    start: 1_796_083_200,
                    requests: 1,
                    tokens: 100,
                },
                UsageBucket {
                    start: 1_796_086_800,
                    requests: 1,
                    tokens: 50,
                },
            ],
            token_calls: vec![],
            dropped: 0,
            enabled: true,
        }
    }

    #[test]
    fn bars_scale_to_the_largest_bucket() {
        assert_eq!(bar(100, 100).chars().count(), BAR_CELLS);
        assert_eq!(bar(50, 100), "█".repeat(BAR_CELLS / 2));
        assert_eq!(bar(1, 1000), "▏");
        assert_eq!(bar(0, 10), "");
    }

    #[test]
    fn table_and_csv() {
        let t = table(&result());
        assert!(t.contains("AGENT"), "{t}");
        assert!(t.contains("12.3k"), "{t}");
        assert!(t.contains("12-01 01:00"), "{t}");
        assert_eq!(
            csv(&result()).lines().nth(1),
            Some("\"a,b\",2,0,12345,7,0,0")
        );
    }
}
