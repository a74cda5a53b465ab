//! Time as the engine sees it: unix milliseconds passed in by the caller, so detectors and the
//! block table are pure functions of their input and tests can move time at will.

/// Milliseconds since the unix epoch.
pub type Millis = u64;

/// The wall clock, for the I/O edge only.
pub fn wall_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A time source the I/O layer reads: wall time anchored at start and advanced by tokio's
/// monotonic clock, so `tokio::time::pause()`/`advance()` move it in tests and a wall-clock step
/// never runs rate windows backwards.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall_at_start: Millis,
    start: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            wall_at_start: wall_ms(),
            start: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> Millis {
        self.wall_at_start + self.start.elapsed().as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
