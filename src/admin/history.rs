//! What happened per minute over the last hour, for the dashboard's attack chart: blocks by type
//! and alerts, in a fixed ring of [`MINUTES`] slots (constant memory however busy the attack).

use serde::{Deserialize, Serialize};

use crate::blocks::BlockType;
use crate::clock::Millis;

/// Minutes kept: the chart shows the last hour.
pub const MINUTES: usize = 60;

const TYPES: usize = BlockType::ALL.len();

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Minute number (unix ms / 60 000) this slot holds, so a stale slot reads as empty.
    minute: u64,
    blocks: [u32; TYPES],
    alerts: u32,
}

const EMPTY: Slot = Slot {
    minute: u64::MAX,
    blocks: [0; TYPES],
    alerts: 0,
};

#[derive(Debug)]
pub struct History {
    slots: [Slot; MINUTES],
}

/// The last hour as `/api/stats` shows it: `blocks[TYPE][i]` and `alerts[i]` count minute `i`,
/// which starts at `start + 60 * i` (unix seconds); the last entry is the current minute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryView {
    pub start: u64,
    pub step_secs: u64,
    /// Only the types that occur in the window.
    pub blocks: std::collections::BTreeMap<String, Vec<u32>>,
    pub alerts: Vec<u32>,
}

impl History {
    pub const fn new() -> Self {
        Self {
            slots: [EMPTY; MINUTES],
        }
    }

    fn slot(&mut self, at: Millis) -> &mut Slot {
        let minute = at / 60_000;
        let s = &mut self.slots[(minute % MINUTES as u64) as usize];
        if s.minute != minute {
            *s = Slot { minute, ..EMPTY };
        }
        s
    }

    pub fn block(&mut self, at: Millis, kind: BlockType) {
        let s = self.slot(at);
        s.blocks[kind as usize] = s.blocks[kind as usize].saturating_add(1);
    }

    pub fn alert(&mut self, at: Millis) {
        let s = self.slot(at);
        s.alerts = s.alerts.saturating_add(1);
    }

    /// The [`MINUTES`] minutes ending with the one containing `now`.
    pub fn view(&self, now: Millis) -> HistoryView {
        let last = now / 60_000;
        let first = last.saturating_sub(MINUTES as u64 - 1);
        let mut per_type = [[0u32; MINUTES]; TYPES];
        let mut alerts = vec![0u32; MINUTES];
        for (i, minute) in (first..=last).enumerate() {
            let s = &self.slots[(minute % MINUTES as u64) as usize];
            if s.minute != minute {
                continue;
            }
            for (row, n) in per_type.iter_mut().zip(s.blocks) {
                row[i] = n;
            }
            alerts[i] = s.alerts;
        }
        let blocks = BlockType::ALL
            .iter()
            .zip(per_type)
            .filter(|(_, counts)| counts.iter().any(|c| *c > 0))
            .map(|(t, counts)| (t.as_str().to_string(), counts.to_vec()))
            .collect();
        HistoryView {
            start: first * 60,
            step_secs: 60,
            blocks,
            alerts,
        }
    }
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_minute_and_forgets_after_an_hour() {
        let mut h = History::new();
        let t0 = 1_700_000_000_000 / 60_000 * 60_000;
        h.block(t0, BlockType::Scanner);
        h.block(t0 + 59_999, BlockType::Scanner);
        h.block(t0 + 60_000, BlockType::Register);
        h.alert(t0 + 60_000);
        let v = h.view(t0 + 60_000);
        assert_eq!(v.start, (t0 + 60_000) / 1000 - 59 * 60);
        assert_eq!(v.blocks["SCANNER"][58], 2);
        assert_eq!(v.blocks["REGISTER"][59], 1);
        assert_eq!(v.alerts[59], 1);
        assert_eq!(v.blocks.len(), 2);

        // An hour later the same slots are reused and the old counts are gone.
        let later = t0 + 60 * 60_000;
        h.block(later, BlockType::Flood);
        let v = h.view(later);
        assert_eq!(v.blocks.get("SCANNER"), None);
        assert_eq!(v.blocks["REGISTER"][0], 1);
        assert_eq!(v.blocks["FLOOD"][59], 1);
        assert_eq!(v.alerts.iter().sum::<u32>(), 1);
    }
}
