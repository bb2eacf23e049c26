//! What people see: the status page at `/` (server-rendered HTML that
//! refreshes itself) and the plain-text views behind `outpost fleet` and
//! `outpost queue`.

use std::fmt::Write as _;
use std::time::Duration;

use crate::scheduler::Snapshot;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An agent's warm keys for people: how many, and the first few, short.
fn warm_summary(keys: &[String]) -> String {
    let shown: Vec<&str> = keys.iter().take(4).map(|k| &k[..k.len().min(12)]).collect();
    let more = keys.len().saturating_sub(shown.len());
    let mut text = format!(
        "{} warm key{} ({}",
        keys.len(),
        if keys.len() == 1 { "" } else { "s" },
        shown.join(", ")
    );
    if more > 0 {
        text.push_str(&format!(", {more} more"));
    }
    text.push(')');
    text
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.0} ms", d.as_secs_f64() * 1000.0),
    )
}

/// `outpost fleet`: one line per agent.
pub fn fleet_text(s: &Snapshot) -> String {
    let mut out = format!(
        "{:<28} {:<16} {:<14} {:<7} {:<9} {:<10} {}\n",
        "AGENT", "HOST", "PLATFORM", "SLOTS", "STATE", "HEARTBEAT", "GPUS"
    );
    let mut agents = s.agents.clone();
    agents.sort_by(|a, b| a.id.cmp(&b.id));
    for a in agents {
        let state = if !a.connected {
            "away"
        } else if a.draining {
            "draining"
        } else {
            "ready"
        };
        let _ = writeln!(
            out,
            "{:<28} {:<16} {:<14} {:<7} {:<9} {:<10} {}",
            a.id,
            a.hostname,
            a.platform,
            format!("{}/{}", a.used_slots, a.slots),
            state,
            format!("{}s ago", a.last_heartbeat.as_secs()),
            if a.gpus.is_empty() {
                "-".to_owned()
            } else {
                a.gpus.join("; ")
            }
        );
    }
    for a in &s.agents {
        if !a.warm_keys.is_empty() {
            let _ = writeln!(out, "warm: {} {}", a.id, warm_summary(&a.warm_keys));
        }
    }
    // Said plainly: an agent that bounds actions by rlimits alone does not
    // bound their memory (its isolation detail says so).
    for a in &s.agents {
        if a.isolation
            .iter()
            .any(|i| i.contains("memory not enforced"))
        {
            let _ = writeln!(
                out,
                "note: {} does not enforce action memory limits (no delegated cgroup: rlimits only)",
                a.id
            );
        }
    }
    out
}

/// `outpost queue`: queued actions per platform, then totals.
pub fn queue_text(s: &Snapshot) -> String {
    let mut out = format!("{:<60} {}\n", "PLATFORM", "QUEUED");
    for (platform, n) in &s.queue {
        let _ = writeln!(out, "{platform:<60} {n}");
    }
    let _ = writeln!(out, "\n{} queued, {} executing", s.queued, s.executing);
    out
}

/// The status page.
pub fn page(s: &Snapshot, running: &[crate::execution::live::Running]) -> String {
    let mut html = String::from(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>Outpost</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#1d2330;background:#f7f8fa}
h1{font-size:1.4rem;margin:0 0 .2rem}h2{font-size:1.05rem;margin:1.8rem 0 .5rem}
.sub{color:#667085;margin-bottom:1rem}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px rgba(16,24,40,.08)}
th,td{text-align:left;padding:.45rem .7rem;border-bottom:1px solid #eaecf0;vertical-align:top}
th{background:#f2f4f7;font-weight:600;font-size:.8rem;text-transform:uppercase;letter-spacing:.03em;color:#475467}
code{font-size:.8rem;color:#344054}.ok{color:#067647}.bad{color:#b42318}.dim{color:#98a2b3}
.pill{display:inline-block;padding:0 .5rem;border-radius:999px;font-size:.75rem;background:#ecfdf3;color:#067647}
.pill.away{background:#fef3f2;color:#b42318}.pill.draining{background:#fffaeb;color:#b54708}
.cards{display:flex;gap:1rem}.card{background:#fff;padding:.8rem 1.2rem;box-shadow:0 1px 2px rgba(16,24,40,.08);min-width:8rem}
.card b{display:block;font-size:1.5rem}
</style></head><body>
<h1>Outpost</h1><div class="sub">remote build execution &middot; refreshes every 5 seconds</div>
"#,
    );
    let connected = s.agents.iter().filter(|a| a.connected).count();
    let _ = write!(
        html,
        r#"<div class="cards"><div class="card"><b>{connected}</b>agents connected</div><div class="card"><b>{}</b>queued</div><div class="card"><b>{}</b>executing</div></div>"#,
        s.queued, s.executing
    );
    html.push_str("<h2>Fleet</h2><table><tr><th>Agent</th><th>Host</th><th>Platform</th><th>GPUs</th><th>Isolation</th><th>Slots used</th><th>Last heartbeat</th><th>State</th></tr>");
    let mut agents = s.agents.clone();
    agents.sort_by(|a, b| a.id.cmp(&b.id));
    if agents.is_empty() {
        html.push_str(r#"<tr><td colspan="8" class="dim">No agent has connected. Start one with <code>outpost agent --coordinator grpc://HOST:PORT</code>.</td></tr>"#);
    }
    for a in &agents {
        let (class, state) = if !a.connected {
            ("away", "away")
        } else if a.draining {
            ("draining", "draining")
        } else {
            ("", "ready")
        };
        let _ = write!(
            html,
            r#"<tr><td><code>{}</code></td><td>{}</td><td>{}<div class="dim">{}</div></td><td>{}</td><td>{}</td><td>{} / {}</td><td>{}s ago</td><td><span class="pill {class}">{state}</span></td></tr>"#,
            escape(&a.id),
            escape(&a.hostname),
            escape(&a.platform),
            escape(&a.os_version),
            if a.gpus.is_empty() {
                "-".to_owned()
            } else {
                escape(&a.gpus.join("; "))
            },
            escape(&a.isolation.join(", "))
                + &if a.warm_keys.is_empty() {
                    String::new()
                } else {
                    format!(
                        r#"<div class="dim">warm: {}</div>"#,
                        escape(&warm_summary(&a.warm_keys))
                    )
                },
            a.used_slots,
            a.slots,
            a.last_heartbeat.as_secs(),
        );
    }
    html.push_str("</table><h2>Queue</h2><table><tr><th>Platform</th><th>Queued</th></tr>");
    if s.queue.is_empty() {
        html.push_str(r#"<tr><td colspan="2" class="dim">Nothing is waiting.</td></tr>"#);
    }
    for (platform, n) in &s.queue {
        let _ = write!(
            html,
            "<tr><td><code>{}</code></td><td>{n}</td></tr>",
            escape(platform)
        );
    }
    html.push_str("</table>");
    running_actions(&mut html, running);
    html.push_str("<h2>Recent actions</h2><table><tr><th>Action</th><th>Agent</th><th>Queued</th><th>Fetch</th><th>Run</th><th>Upload</th><th>Result</th><th>Logs</th></tr>");
    if s.recent.is_empty() {
        html.push_str(r#"<tr><td colspan="8" class="dim">No action has finished yet.</td></tr>"#);
    }
    for r in &s.recent {
        let result = match (r.error.is_empty(), r.exit_code) {
            (true, Some(0)) => r#"<span class="ok">exit 0</span>"#.to_owned(),
            (true, Some(code)) => format!(r#"<span class="bad">exit {code}</span>"#),
            (_, _) => format!(r#"<span class="bad">{}</span>"#, escape(&r.error)),
        };
        let link = |name: &str, d: &Option<outpost_proto::digest::Digest>| {
            d.filter(|d| d.size > 0).map_or_else(String::new, |d| {
                format!(
                    r#"<a href="/blobs/{}/{}">{name}</a> "#,
                    d.hash_hex(),
                    d.size
                )
            })
        };
        let _ = write!(
            html,
            "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{result}</td><td>{}{}</td></tr>",
            escape(&r.action_digest.to_string()),
            escape(&r.worker),
            ms(r.queued),
            ms(r.fetch),
            ms(r.execution),
            ms(r.upload),
            link("stdout", &r.stdout),
            link("stderr", &r.stderr),
        );
    }
    html.push_str("</table></body></html>\n");
    html
}

/// Actions whose agents stream their output, with links to it as far as
/// it came (the page refreshes, and so does what the links show).
fn running_actions(html: &mut String, running: &[crate::execution::live::Running]) {
    html.push_str("<h2>Running actions</h2><table><tr><th>Operation</th><th>Agent</th><th>Live output</th></tr>");
    if running.is_empty() {
        html.push_str(r#"<tr><td colspan="3" class="dim">No running action has printed anything yet.</td></tr>"#);
    }
    for r in running {
        let link = |kind: &str, bytes: u64| {
            if bytes == 0 {
                return String::new();
            }
            format!(
                r#"<a href="/live/{}/{kind}">{kind}</a> <span class="dim">{bytes} bytes</span> "#,
                escape(&r.operation)
            )
        };
        let _ = write!(
            html,
            "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}{}</td></tr>",
            escape(&r.operation),
            escape(&r.agent),
            link("stdout", r.stdout),
            link("stderr", r.stderr),
        );
    }
    html.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::AgentSummary;

    #[test]
    fn each_gpu_and_whether_it_is_in_use_is_shown() {
        let gpus = vec![
            "#0 l4 (24GiB, compute capability 8.9), in use".to_owned(),
            "#1 l4 (24GiB, compute capability 8.9)".to_owned(),
        ];
        let snapshot = Snapshot {
            agents: vec![AgentSummary {
                id: "gpu-box".to_owned(),
                hostname: "gpu-box".to_owned(),
                connected: true,
                slots: 4,
                used_slots: 1,
                draining: false,
                platform: "linux/amd64".to_owned(),
                os_version: String::new(),
                isolation: Vec::new(),
                gpus,
                last_heartbeat: Duration::ZERO,
                warm_keys: Vec::new(),
            }],
            ..Snapshot::default()
        };
        let shown =
            "#0 l4 (24GiB, compute capability 8.9), in use; #1 l4 (24GiB, compute capability 8.9)";
        assert!(
            fleet_text(&snapshot).contains(shown),
            "{}",
            fleet_text(&snapshot)
        );
        assert!(page(&snapshot, &[]).contains(shown));
    }
}
