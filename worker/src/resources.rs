//! What the container may use: its memory limit (cgroup v2 `memory.max`, v1
//! `memory.limit_in_bytes`), else the machine's memory; its CPU quota (cgroup
//! v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), else the CPUs
//! the process may run on.

use std::path::Path;

/// The memory this process may use, in bytes.
pub fn memory_limit() -> u64 {
    memory_limit_under(Path::new("/sys/fs/cgroup"), Path::new("/proc/meminfo")).unwrap_or(8 << 30)
}

fn memory_limit_under(cgroup: &Path, meminfo: &Path) -> Option<u64> {
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    let cgroup_limit = read(&cgroup.join("memory.max"))
        .or_else(|| read(&cgroup.join("memory/memory.limit_in_bytes")))
        .and_then(|s| s.trim().parse::<u64>().ok());
    let machine = read(meminfo).and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    // cgroup v1 reports "no limit" as a huge number; the machine's memory bounds it.
    match (cgroup_limit, machine) {
        (Some(c), Some(m)) => Some(c.min(m)),
        (c, m) => c.or(m),
    }
}

/// The CPUs this process may keep busy: the CPU quota rounded up, at most the
/// CPUs it may run on.
pub fn cpu_limit() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpu_quota_under(Path::new("/sys/fs/cgroup")).map_or(cpus, |q| q.min(cpus))
}

fn cpu_quota_under(cgroup: &Path) -> Option<usize> {
    let read = |p: &str| std::fs::read_to_string(cgroup.join(p)).ok();
    let (quota, period) = match read("cpu.max") {
        // "max 100000" (no limit) or "150000 100000".
        Some(v2) => {
            let mut fields = v2.split_whitespace();
            (fields.next()?.parse::<u64>().ok()?, fields.next()?.parse::<u64>().ok()?)
        }
        None => {
            let quota = read("cpu/cpu.cfs_quota_us")?.trim().parse::<i64>().ok()?;
            let period = read("cpu/cpu.cfs_period_us")?.trim().parse::<u64>().ok()?;
            (u64::try_from(quota).ok()?, period)
        }
    };
    (quota > 0 && period > 0).then(|| quota.div_ceil(period) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cpu_quota_of_either_cgroup_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(cpu_quota_under(dir.path()), None, "no cgroup files");
        std::fs::write(dir.path().join("cpu.max"), "max 100000\n").expect("write");
        assert_eq!(cpu_quota_under(dir.path()), None, "v2 without a limit");
        std::fs::write(dir.path().join("cpu.max"), "150000 100000\n").expect("write");
        assert_eq!(cpu_quota_under(dir.path()), Some(2), "1.5 CPUs round up");
        let v1 = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(v1.path().join("cpu")).expect("mkdir");
        std::fs::write(v1.path().join("cpu/cpu.cfs_quota_us"), "-1\n").expect("write");
        std::fs::write(v1.path().join("cpu/cpu.cfs_period_us"), "100000\n").expect("write");
        assert_eq!(cpu_quota_under(v1.path()), None, "v1 without a limit");
        std::fs::write(v1.path().join("cpu/cpu.cfs_quota_us"), "400000\n").expect("write");
        assert_eq!(cpu_quota_under(v1.path()), Some(4), "v1 quota");
    }

    #[test]
    fn reads_the_cgroup_limit_else_the_machine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meminfo = dir.path().join("meminfo");
        std::fs::write(&meminfo, "MemTotal:       16384 kB\nMemFree: 1 kB\n").expect("write");
        assert_eq!(memory_limit_under(dir.path(), &meminfo), Some(16 << 20), "no cgroup file: the machine");
        std::fs::write(dir.path().join("memory.max"), "max\n").expect("write");
        assert_eq!(memory_limit_under(dir.path(), &meminfo), Some(16 << 20), "v2 without a limit");
        std::fs::write(dir.path().join("memory.max"), "4194304\n").expect("write");
        assert_eq!(memory_limit_under(dir.path(), &meminfo), Some(4 << 20), "v2 limit");
    }
}
