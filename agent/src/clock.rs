//! The two clocks: wall time (what people and identity providers write) and the boot
//! clock the kernel judges sessions by (`bpf_ktime_get_boot_ns` is CLOCK_BOOTTIME), which
//! a wall-clock step cannot move.

use time::OffsetDateTime;

/// Both clocks read at (nearly) the same instant.
#[derive(Clone, Copy, Debug)]
pub struct ClockPair {
    pub wall: OffsetDateTime,
    pub boot_ns: i64,
}

impl ClockPair {
    pub fn now() -> Self {
        Self {
            wall: OffsetDateTime::now_utc(),
            boot_ns: boot_now_ns(),
        }
    }

    /// The boot-clock time of a wall-clock instant, as seen from this pair. Negative
    /// for instants before this boot.
    pub fn boot_ns_of(&self, wall: OffsetDateTime) -> i64 {
        let behind = (self.wall - wall).whole_nanoseconds();
        let behind = i64::try_from(behind).unwrap_or(if behind > 0 { i64::MAX } else { i64::MIN });
        self.boot_ns.saturating_sub(behind)
    }

    /// The wall-clock instant of a boot-clock time, as seen from this pair.
    pub fn wall_of(&self, boot_ns: i64) -> OffsetDateTime {
        self.wall - time::Duration::nanoseconds(self.boot_ns.saturating_sub(boot_ns))
    }
}

/// CLOCK_BOOTTIME in nanoseconds.
pub fn boot_now_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer to a timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_BOOTTIME is always available on Linux");
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// This boot's id: boot-clock times recorded under another id mean nothing now.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Where the time of a long operation went (a bulk import): named laps, in order,
/// logged as one field (`parse=120ms plan=310ms ...`).
#[derive(Debug)]
pub struct Laps {
    last: std::time::Instant,
    laps: Vec<(&'static str, std::time::Duration)>,
}

impl Laps {
    pub fn start() -> Self {
        Self {
            last: std::time::Instant::now(),
            laps: Vec::new(),
        }
    }

    /// Ends the lap named `name`, begun when the last one ended.
    pub fn lap(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.laps.push((name, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Laps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, took)) in self.laps.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={}ms", took.as_millis())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_consistent_and_do_not_overflow() {
        let pair = ClockPair::now();
        let hour_ago = pair.wall - time::Duration::hours(1);
        assert_eq!(pair.boot_ns_of(hour_ago), pair.boot_ns - 3_600_000_000_000);
        assert_eq!(pair.wall_of(pair.boot_ns - 3_600_000_000_000), hour_ago);
        let ancient = OffsetDateTime::UNIX_EPOCH - time::Duration::days(365 * 300);
        assert!(pair.boot_ns_of(ancient) < -(1i64 << 62));
        assert!(boot_now_ns() >= pair.boot_ns);
    }

    #[test]
    fn laps_are_shown_in_order_with_their_names() {
        let mut laps = Laps::start();
        laps.lap("parse");
        std::thread::sleep(std::time::Duration::from_millis(3));
        laps.lap("plan");
        let shown = laps.to_string();
        let (parse, plan) = shown.split_once(' ').expect("two laps");
        assert!(
            parse.starts_with("parse=") && parse.ends_with("ms"),
            "{shown}"
        );
        let plan_ms: u64 = plan
            .strip_prefix("plan=")
            .and_then(|v| v.strip_suffix("ms"))
            .and_then(|v| v.parse().ok())
            .expect("plan=Nms");
        assert!(plan_ms >= 3, "{shown}");
    }
}
