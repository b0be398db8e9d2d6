//! What the container may use: its memory limit (cgroup v2 `memory.max`, v1
//! `memory.limit_in_bytes`), else the machine's memory.

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

#[cfg(test)]
mod tests {
    use super::*;

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
