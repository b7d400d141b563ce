//! The machine a run measures on, as the report names it and as the
//! benchmarks that pin threads to CPUs count them.

pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned()
}

pub fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1).map(str::trim))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}
