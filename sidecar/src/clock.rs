//! The one clock lease deadlines are read on: the machine's monotonic clock
//! (`CLOCK_MONOTONIC`), shared with the module, which compares the
//! `KEEL.LEASE` deadlines this sidecar sends against its own reading of it.
//! `std::time::Instant` is the same clock on Linux but gives no number the
//! module could compare with, hence this call.

/// Microseconds on `CLOCK_MONOTONIC`.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, exclusively borrowed out-pointer for the
    // call's duration; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Milliseconds on `CLOCK_MONOTONIC` (the unit of `KEEL.LEASE`).
pub fn monotonic_ms() -> u64 {
    monotonic_us() / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_never_goes_back_and_agrees_with_itself() {
        let a = monotonic_us();
        let b = monotonic_ms();
        let c = monotonic_us();
        assert!(a <= c);
        assert!(a / 1_000 <= b && b <= c / 1_000);
    }
}
