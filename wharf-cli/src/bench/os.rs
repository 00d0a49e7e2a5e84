//! What the bench reads from and asks of the operating system: CPU
//! pinning, and a process's CPU time, memory and open descriptors from
//! `/proc`. Linux only; elsewhere pinning fails and the figures are `None`.

use std::io;

/// Pins the calling thread, and so every thread it starts from now on, to
/// `cpu`.
pub(crate) fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no such CPU"));
        }
        // SAFETY: `cpu_set_t` is plain data, for which all zeroes is the
        // empty set; CPU_SET writes inside it (`cpu` is below CPU_SETSIZE),
        // and the kernel reads `size_of` bytes of it during the call.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cpu;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "CPU pinning is implemented on Linux only",
        ))
    }
}

/// CPUs this process may run on.
pub(crate) fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU time (user + system, all threads) of process `pid` so far, in
/// seconds, from `/proc/PID/stat`. Ticks are USER_HZ, 100 per second on
/// every Linux ABI.
pub(crate) fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&stat)
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line, in seconds.
pub(crate) fn parse_stat_cpu(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces; count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Resident memory of process `pid`: (VmRSS, VmHWM) in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Open descriptors of process `pid`.
pub(crate) fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_spaces_in_the_name() {
        let line = "42 (a b) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0";
        assert_eq!(parse_stat_cpu(line), Some(3.0));
    }

    #[test]
    fn own_figures_read_on_linux() {
        if cfg!(target_os = "linux") {
            let me = std::process::id();
            assert!(cpu_secs(me).is_some());
            let (rss, hwm) = rss_kib(me).expect("status parses");
            assert!(rss > 0 && hwm >= rss);
            assert!(open_fds(me).expect("fd dir") >= 3);
        }
    }
}
