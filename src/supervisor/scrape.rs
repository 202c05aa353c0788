//! Every worker's metrics on the admin listener's `/metrics`: the supervisor fetches each
//! running worker's own `/metrics` when it is scraped and merges them into one exposition, each
//! series labelled `worker="worker-N"` — the slot's id, which a restart or a rolling restart
//! (a new pid, a new port) keeps, so one Prometheus job sees the whole cluster. Also what the
//! kernel knows of each worker process: resident memory and CPU time.

use std::{collections::HashMap, fmt::Write, time::Duration};

use super::probe;

/// How long a scrape waits for one worker: well under a Prometheus scrape timeout (10 s).
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest exposition read from one worker.
const FETCH_LIMIT: usize = 4 << 20;

/// One metric family of the merged exposition: its `# HELP` and `# TYPE` lines, then every
/// worker's samples of it.
#[derive(Default)]
struct Family {
    comments: Vec<String>,
    samples: Vec<String>,
}

/// Merges expositions into one in which each family appears once (the text format allows no
/// family twice), every sample labelled with its worker.
#[derive(Default)]
pub struct Merged {
    order: Vec<String>,
    families: HashMap<String, Family>,
}

impl Merged {
    /// Adds one worker's exposition.
    pub fn add(&mut self, worker: &str, text: &str) {
        let mut current: Option<String> = None;
        for line in text.lines() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if let (Some("HELP" | "TYPE"), Some(name)) = (words.next(), words.next()) {
                    let family = self.family(name);
                    if !family.comments.iter().any(|c| c == line) {
                        family.comments.push(line.to_owned());
                    }
                    current = Some(name.to_owned());
                }
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            // A histogram's `_bucket`, `_sum` and `_count` belong to the family declared
            // before them.
            let family = match &current {
                Some(family) if belongs(name, family) => family.clone(),
                _ => name.to_owned(),
            };
            let labelled = match line[name_end..].strip_prefix('{') {
                Some(rest) if rest.starts_with('}') => {
                    format!("{name}{{worker=\"{worker}\"{rest}")
                }
                Some(rest) => format!("{name}{{worker=\"{worker}\",{rest}"),
                None => format!("{name}{{worker=\"{worker}\"}}{}", &line[name_end..]),
            };
            self.family(&family).samples.push(labelled);
        }
    }

    fn family(&mut self, name: &str) -> &mut Family {
        if !self.families.contains_key(name) {
            self.order.push(name.to_owned());
        }
        self.families.entry(name.to_owned()).or_default()
    }

    /// The merged exposition.
    pub fn render(self, out: &mut String) {
        let mut families = self.families;
        for name in self.order {
            if let Some(family) = families.remove(&name) {
                for line in family.comments.iter().chain(&family.samples) {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    }
}

/// Whether a sample called `name` is of `family`: the family's own name, or a histogram's or
/// summary's `_bucket`, `_sum`, `_count`.
fn belongs(name: &str, family: &str) -> bool {
    name.strip_prefix(family)
        .is_some_and(|rest| matches!(rest, "" | "_bucket" | "_sum" | "_count"))
}

/// Fetches `/metrics` of every `(worker id, port)` at once and merges them; a worker that does
/// not answer in time is left out, and `taskd_worker_metrics_up` says which.
pub async fn workers(targets: &[(String, u16)]) -> String {
    let fetched = futures_util::future::join_all(
        targets
            .iter()
            .map(|(_, port)| probe::fetch(*port, "/metrics", FETCH_TIMEOUT, FETCH_LIMIT)),
    )
    .await;
    let mut merged = Merged::default();
    let mut out = String::from(
        "# HELP taskd_worker_metrics_up 1 when the worker's own /metrics answered this scrape.\n\
         # TYPE taskd_worker_metrics_up gauge\n",
    );
    for ((id, _), body) in targets.iter().zip(&fetched) {
        let _ = writeln!(
            out,
            "taskd_worker_metrics_up{{worker=\"{id}\"}} {}",
            u8::from(body.is_some())
        );
        if let Some(body) = body {
            merged.add(id, &String::from_utf8_lossy(body));
        }
    }
    merged.render(&mut out);
    out
}

/// What the kernel reports of a running process: resident memory and CPU time used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
}

/// [`Usage`] of `pid`, from `/proc`; `None` when it is gone (or not Linux).
pub fn usage(pid: u32) -> Option<Usage> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // After the parenthesised command name: state is field 3, utime 14 and stime 15.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf(3) has no preconditions.
    let (page, ticks) = unsafe {
        (
            libc::sysconf(libc::_SC_PAGESIZE),
            libc::sysconf(libc::_SC_CLK_TCK),
        )
    };
    Some(Usage {
        rss_bytes: resident_pages * u64::try_from(page).ok()?,
        cpu_seconds: (utime + stime) as f64 / ticks.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = "\
# HELP http_requests_total Requests.
# TYPE http_requests_total counter
http_requests_total{method=\"GET\",status=\"200\"} 3
# TYPE latency histogram
latency_bucket{le=\"0.1\"} 1
latency_bucket{le=\"+Inf\"} 2
latency_sum 0.3
latency_count 2
redis_breaker_open 0
";

    #[test]
    fn each_family_once_with_every_workers_samples_labelled() {
        let mut merged = Merged::default();
        merged.add("worker-1", ONE);
        merged.add("worker-2", &ONE.replace(" 3\n", " 5\n"));
        let mut out = String::new();
        merged.render(&mut out);
        assert_eq!(out.matches("# TYPE http_requests_total counter").count(), 1);
        assert_eq!(out.matches("# TYPE latency histogram").count(), 1);
        let lines: Vec<&str> = out.lines().collect();
        let position = |needle: &str| lines.iter().position(|l| *l == needle).unwrap();
        // Both workers' samples sit in their family's group, right after its comments.
        let counter = position("# TYPE http_requests_total counter");
        assert_eq!(
            lines[counter + 1],
            "http_requests_total{worker=\"worker-1\",method=\"GET\",status=\"200\"} 3"
        );
        assert_eq!(
            lines[counter + 2],
            "http_requests_total{worker=\"worker-2\",method=\"GET\",status=\"200\"} 5"
        );
        let histogram = position("# TYPE latency histogram");
        assert_eq!(
            lines[histogram + 1..histogram + 9],
            [
                "latency_bucket{worker=\"worker-1\",le=\"0.1\"} 1",
                "latency_bucket{worker=\"worker-1\",le=\"+Inf\"} 2",
                "latency_sum{worker=\"worker-1\"} 0.3",
                "latency_count{worker=\"worker-1\"} 2",
                "latency_bucket{worker=\"worker-2\",le=\"0.1\"} 1",
                "latency_bucket{worker=\"worker-2\",le=\"+Inf\"} 2",
                "latency_sum{worker=\"worker-2\"} 0.3",
                "latency_count{worker=\"worker-2\"} 2",
            ]
        );
        // A sample with no comment before it makes a family of its own; in the histogram's
        // group it would be misfiled.
        assert!(out.ends_with(
            "redis_breaker_open{worker=\"worker-1\"} 0\nredis_breaker_open{worker=\"worker-2\"} 0\n"
        ));
    }

    #[test]
    fn usage_of_this_process() {
        let usage = usage(std::process::id()).expect("this process is running");
        assert!(usage.rss_bytes > 1 << 20, "{usage:?}");
        assert!(usage.cpu_seconds >= 0.0);
    }
}
