//! Table 2c: nftables with large sets against this project's maps at 100k
//! and 1M policies: load time, kernel memory (each map's too), packets/s.

use std::time::Duration;

use crate::{
    compare::{Mode, Setup, median, udp_pps},
    report::{Report, count_name, outln},
};

/// The memory of this project's maps (each pinned map's `bytes_memlock`,
/// what the kernel charges for it), MiB: (all maps, `POLICIES`, each map
/// from the largest).
fn map_mib(setup: &Setup) -> (f64, f64, Vec<(String, f64)>) {
    let (pins, _) = setup.pins.as_ref().expect("ours");
    let dir = pins.path().join("maps");
    let mut each = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("pinned maps") {
        let path = entry.expect("entry").path();
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&path)
            .output()
            .expect("bpftool");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool -j");
        let mib = info["bytes_memlock"].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        each.push((name, mib));
    }
    each.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total = each.iter().map(|(_, mib)| mib).sum();
    let policies = each.iter().find(|(n, _)| n == "POLICIES").map_or(0.0, |(_, mib)| *mib);
    (total, policies, each)
}

/// Past iptables' range: nftables' set against this project's maps at
/// 100k and 1M policies — the time to load them, the kernel memory they
/// take, and UDP packets/s through each next to no filtering.
pub fn run(quick: bool, report: &mut Report) {
    let counts: &[u32] = if quick { &[100_000] } else { &[100_000, 1_000_000] };
    let (secs, rounds) = if quick { (1.0, 1) } else { (3.0, 3) };

    let none = Setup::new(Mode::None, 10);
    let mut out = String::new();
    outln!(
        out,
        "\n### 2c. nftables with large sets\n\nThe set-ups of table 2 at {} policies, nftables against this project (iptables is out of the race well before: 0.06x of no filtering at 10k). nftables: the time `nft -f` takes to load the table with its set, and the kernel memory that adds (slab + vmalloc from /proc/meminfo, around the `nft -f` run); ours: the same, around the whole load (maps, programs, every entry), and each map's memory as the kernel charges it (`bytes_memlock`: the LRU maps are preallocated for their capacities, the hash maps only the agent writes grow with their entries). UDP packets/s as in table 2, {secs} s, median of {rounds}.\n",
        counts.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" and ")
    );
    outln!(
        out,
        "| policies | nftables load | nftables kernel memory | our kernel memory, measured the same way | our maps as charged (POLICIES) | UDP pkt/s, no filtering | eBPF | nftables | eBPF / nftables |"
    );
    outln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut per_map = Vec::new();
    for &n in counts {
        // Memory freed by earlier set-ups is returned after an RCU grace
        // period: let it settle before the kernel's memory is read.
        std::thread::sleep(Duration::from_secs(2));
        let nft = Setup::new(Mode::Nftables, n);
        let ours = Setup::new(Mode::Ours, n);
        let (maps, policies, each) = map_mib(&ours);
        let listed: Vec<String> = each
            .iter()
            .filter(|(_, mib)| *mib >= 0.05)
            .map(|(name, mib)| format!("{name} {mib:.1}"))
            .collect();
        per_map.push(format!("{n} policies, MiB: {}", listed.join(", ")));
        let mut pps = [vec![], vec![], vec![]];
        for _ in 0..rounds {
            for (i, s) in [&none, &ours, &nft].iter().enumerate() {
                pps[i].push(udp_pps(s, secs));
            }
        }
        let pps = pps.map(median);
        let name = count_name(u64::from(n));
        let memory = format!("kernel_memory_{name}_mib");
        report.figure_vs(memory, ours.load_mib, "MiB", "nftables", nft.load_mib);
        report.figure(format!("maps_memlock_{name}_mib"), maps, "MiB");
        report.figure(format!("nftables_kernel_memory_{name}_mib"), nft.load_mib, "MiB");
        report.figure(format!("policies_map_{name}_mib"), policies, "MiB");
        let pps_name = format!("udp_pps_{name}_policies");
        report.figure_vs(pps_name, pps[1], "packets/s", "nftables", pps[2]);
        outln!(
            out,
            "| {n} | {:.1} s | {:.0} MiB | {:.0} MiB ({:.2}x) | {maps:.0} MiB ({policies:.0} MiB) | {:.0} | {:.0} ({:.2}x) | {:.0} ({:.2}x) | **{:.2}x** |",
            nft.load.as_secs_f64(),
            nft.load_mib,
            ours.load_mib,
            ours.load_mib / nft.load_mib,
            pps[0],
            pps[1],
            pps[1] / pps[0],
            pps[2],
            pps[2] / pps[0],
            pps[1] / pps[2]
        );
    }
    for line in per_map {
        outln!(out, "\nEach of our maps as charged at {line}.");
    }
    report.section(out);
}
