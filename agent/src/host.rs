//! The host guard's readings of this process: its resident memory, read with sysinfo, for
//! `GET /v1/status`, `/metrics` and the status page. (Free disk space on the staging volume is
//! read by the staging store itself with `statvfs`/`GetDiskFreeSpaceEx` through fs4, for the exact
//! folder, and is what `MIN_FREE_DISK_MB` is checked against before each write.)

use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System};

/// This process's resident memory in bytes, or `None` where the platform does not tell.
pub fn own_memory_bytes() -> Option<u64> {
    let pid = sysinfo::get_current_pid().ok()?;
    let mut system = System::new();
    system.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        false,
        ProcessRefreshKind::nothing().with_memory(),
    );
    system.process(pid).map(sysinfo::Process::memory)
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_memory_is_read_and_plausible() {
        let bytes = super::own_memory_bytes().expect("the platform reports memory");
        // A running test binary holds at least a megabyte and far less than 4 GiB.
        assert!((1 << 20..4 << 30).contains(&bytes), "{bytes}");
    }
}
