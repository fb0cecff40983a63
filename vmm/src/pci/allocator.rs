//! First-fit placement of naturally aligned ranges inside a window, around ranges already in
//! use. The bus recomputes the used ranges from the BARs' current addresses each time, so
//! guest reprogramming never leaves stale bookkeeping behind.

/// A range of guest addresses (memory or I/O ports) that BARs are allocated from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindow {
    pub start: u64,
    pub size: u64,
}

impl PciWindow {
    pub const fn new(start: u64, size: u64) -> Self {
        Self { start, size }
    }

    /// The last address inside the window, or `None` if it is empty or wraps around.
    pub fn last(&self) -> Option<u64> {
        self.start.checked_add(self.size.checked_sub(1)?)
    }

    /// Whether `[base, base + size)` lies entirely inside the window.
    pub fn contains(&self, base: u64, size: u64) -> bool {
        match (
            self.last(),
            size.checked_sub(1).and_then(|s| base.checked_add(s)),
        ) {
            (Some(last), Some(end)) => base >= self.start && end <= last,
            _ => false,
        }
    }
}

/// The lowest `align`-aligned base in `window` where `size` bytes overlap none of `used`
/// (`(base, size)` pairs, in any order). `align` must be a power of two.
pub(crate) fn first_fit(
    window: PciWindow,
    size: u64,
    align: u64,
    used: &[(u64, u64)],
) -> Option<u64> {
    let last = window.last()?;
    if size == 0 || !align.is_power_of_two() {
        return None;
    }
    let mut used: Vec<(u64, u64)> = used.iter().copied().filter(|(_, s)| *s > 0).collect();
    used.sort_unstable();
    let align_up = |addr: u64| addr.checked_add(align - 1).map(|a| a & !(align - 1));
    let mut candidate = align_up(window.start)?;
    for (base, len) in used {
        let end = candidate.checked_add(size - 1)?;
        let used_last = base.saturating_add(len - 1);
        if end < base {
            break;
        }
        if used_last >= candidate {
            candidate = align_up(used_last.checked_add(1)?)?;
        }
    }
    let end = candidate.checked_add(size - 1)?;
    (end <= last).then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_bounds() {
        let window = PciWindow::new(0x1000, 0x1000);
        assert_eq!(window.last(), Some(0x1fff));
        assert!(window.contains(0x1000, 0x1000));
        assert!(window.contains(0x1ff0, 0x10));
        assert!(!window.contains(0x1ff0, 0x11));
        assert!(!window.contains(0xfff, 2));
        assert!(!window.contains(0x1000, 0));
        assert!(!window.contains(u64::MAX, 2));
        assert_eq!(PciWindow::new(0, 0).last(), None);
        assert_eq!(PciWindow::new(u64::MAX, 2).last(), None);
        assert_eq!(PciWindow::new(u64::MAX, 1).last(), Some(u64::MAX));
    }

    #[test]
    fn first_fit_aligns_and_skips_used_ranges() {
        let window = PciWindow::new(0x1000, 0x10000);
        assert_eq!(first_fit(window, 0x100, 0x100, &[]), Some(0x1000));
        assert_eq!(first_fit(window, 0x4000, 0x4000, &[]), Some(0x4000));
        let used = [(0x1000, 0x10), (0x1100, 0x100)];
        assert_eq!(first_fit(window, 0x100, 0x100, &used), Some(0x1200));
        assert_eq!(first_fit(window, 0x10, 0x10, &used), Some(0x1010));
        // Used ranges outside the window or out of order do not confuse it.
        let used = [(0x1200, 0x100), (0x0, 0x1100)];
        assert_eq!(first_fit(window, 0x100, 0x100, &used), Some(0x1100));
        // Full window.
        assert_eq!(first_fit(window, 0x10000, 0x10000, &[]), None);
        assert_eq!(first_fit(window, 0x8000, 0x8000, &[(0x8000, 0x8000)]), None);
        assert_eq!(first_fit(window, 0, 1, &[]), None);
        assert_eq!(first_fit(window, 0x10, 3, &[]), None);
        // Near the top of the address space nothing overflows.
        let top = PciWindow::new(u64::MAX - 0xfff, 0x1000);
        assert_eq!(first_fit(top, 0x1000, 0x1000, &[]), Some(u64::MAX - 0xfff));
        assert_eq!(
            first_fit(top, 0x800, 0x800, &[(u64::MAX - 0xfff, 0x800)]),
            Some(u64::MAX - 0x7ff)
        );
        assert_eq!(
            first_fit(
                top,
                0x800,
                0x800,
                &[(u64::MAX - 0x7ff, 0x800), (u64::MAX - 0xfff, 0x800)]
            ),
            None
        );
    }
}
