//! The process metrics that Prometheus' client libraries export as `process_*`, here under the
//! contract's `dongflow_` prefix (`dongflow_process_*`), and `dongflow_build_info`, read from
//! `/proc/self` on Linux; elsewhere only the build info.

use super::family;

/// Clock ticks a second in `/proc/<pid>/stat` (`USER_HZ`, part of the kernel's ABI: 100 on every
/// architecture Linux ships).
const TICKS_PER_SECOND: f64 = 100.0;

/// Appends the process metrics and the build info to `out`.
pub fn metrics(out: &mut String) {
    family(
        out,
        "dongflow_build_info",
        "gauge",
        "Always 1; the labels say which dongflow this is.",
        &[(
            format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")),
            "1".into(),
        )],
    );
    let one = |v: String| vec![(String::new(), v)];
    if let Some((cpu, start)) = stat() {
        family(
            out,
            "dongflow_process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            &one(format!("{cpu:.2}")),
        );
        if let Some(start) = start {
            family(
                out,
                "dongflow_process_start_time_seconds",
                "gauge",
                "Start time of the process since the Unix epoch, in seconds.",
                &one(format!("{start:.2}")),
            );
        }
    }
    // Memory sizes from `/proc/self/status` (in kB there).
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let memory = [
        (
            "VmRSS:",
            "dongflow_process_resident_memory_bytes",
            "Resident memory size in bytes.",
        ),
        (
            "VmHWM:",
            "dongflow_process_peak_resident_memory_bytes",
            "The most resident memory the process has held, in bytes (VmHWM).",
        ),
        (
            "VmSize:",
            "dongflow_process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
        ),
    ];
    for (field, name, help) in memory {
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
        if let Some(kb) = kb {
            family(out, name, "gauge", help, &one((kb * 1024).to_string()));
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        family(
            out,
            "dongflow_process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            &one(fds.count().to_string()),
        );
    }
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let max_fds = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(max) = max_fds {
        family(
            out,
            "dongflow_process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            &one(max.to_string()),
        );
    }
}

/// CPU seconds (user + system) and the start time (seconds since the epoch), from
/// `/proc/self/stat` and the boot time in `/proc/stat`.
fn stat() -> Option<(f64, Option<f64>)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: fields are counted after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime), 15 (stime) and 22 (starttime) of proc(5), here from field 3 on.
    let ticks = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    let cpu = (ticks(14)? + ticks(15)?) / TICKS_PER_SECOND;
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    let start = boot.zip(ticks(22)).map(|(b, t)| b + t / TICKS_PER_SECOND);
    Some((cpu, start))
}
