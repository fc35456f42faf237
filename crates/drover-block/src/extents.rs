//! Sets of byte ranges within a disk.
//!
//! Replication works on ranges: the dirty extents a bitmap reports, the allocated extents of an
//! image, the ranges already copied. [`ExtentSet`] keeps them in one canonical form so that set
//! algebra (union, intersection, difference) and the sizes reported to the user are exact.
//!
//! Invariants of an [`ExtentSet`] (checked by the property tests below):
//! - ranges are sorted by offset;
//! - no range is empty;
//! - ranges neither overlap nor touch: two ranges that would touch are stored as one.
//!
//! Because of the last rule, two sets with the same bytes compare equal with `==`.
//!
//! Offsets are bytes in `0..=u64::MAX`. An extent whose end would pass `u64::MAX` is cut at
//! `u64::MAX` rather than wrapping, so no input can panic or corrupt the set.

use serde::{Deserialize, Serialize};

/// A contiguous range of bytes: `offset..offset + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn new(offset: u64, len: u64) -> Extent {
        Extent { offset, len }
    }

    /// One past the last byte, saturating at `u64::MAX` (see the module doc).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A sorted, non-overlapping, coalesced set of byte ranges. See the module doc.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ExtentSet {
    /// Half-open `(start, end)` pairs; `start < end`; `end` of one < `start` of the next.
    ranges: Vec<(u64, u64)>,
}

impl ExtentSet {
    pub fn new() -> ExtentSet {
        ExtentSet::default()
    }

    /// A set holding the one range `offset..offset + len` (empty if `len` is 0).
    pub fn from_range(offset: u64, len: u64) -> ExtentSet {
        let mut set = ExtentSet::new();
        set.insert(Extent::new(offset, len));
        set
    }

    /// Number of separate ranges (not bytes; see [`ExtentSet::total_bytes`]).
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Adds a range, merging it with every range it overlaps or touches.
    ///
    /// Appending in ascending order (the common case: extents arrive from a scan of the disk)
    /// costs O(1); an insert in the middle costs O(n) for the shift.
    pub fn insert(&mut self, extent: Extent) {
        let (start, end) = (extent.offset, extent.end());
        if start >= end {
            return;
        }
        if let Some(last) = self.ranges.last_mut() {
            if start > last.1 {
                self.ranges.push((start, end));
                return;
            }
            if start >= last.0 {
                last.1 = last.1.max(end);
                return;
            }
        } else {
            self.ranges.push((start, end));
            return;
        }
        // First range whose end reaches `start` (touching counts: it merges).
        let first = self.ranges.partition_point(|&(_, e)| e < start);
        // One past the last range whose start is at or before `end` (touching merges too).
        let last = self.ranges.partition_point(|&(s, _)| s <= end);
        if first == last {
            self.ranges.insert(first, (start, end));
            return;
        }
        let merged = (start.min(self.ranges[first].0), end.max(self.ranges[last - 1].1));
        self.ranges.splice(first..last, std::iter::once(merged));
    }

    /// Bytes in either set.
    pub fn union(&self, other: &ExtentSet) -> ExtentSet {
        // Merge the two sorted lists, then coalesce in one pass.
        let mut out = ExtentSet { ranges: Vec::with_capacity(self.ranges.len() + other.ranges.len()) };
        let (mut a, mut b) = (self.ranges.iter().peekable(), other.ranges.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => {
                    if x.0 <= y.0 {
                        a.next()
                    } else {
                        b.next()
                    }
                }
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            if let Some(&(s, e)) = next {
                out.push_sorted(s, e);
            }
        }
        out
    }

    /// Bytes in both sets.
    pub fn intersect(&self, other: &ExtentSet) -> ExtentSet {
        let mut out = ExtentSet::new();
        let (mut i, mut j) = (0, 0);
        while i < self.ranges.len() && j < other.ranges.len() {
            let (a, b) = (self.ranges[i], other.ranges[j]);
            let (s, e) = (a.0.max(b.0), a.1.min(b.1));
            if s < e {
                out.push_sorted(s, e);
            }
            // Advance whichever range ends first; the other may still meet the next one.
            if a.1 <= b.1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        out
    }

    /// Bytes in `self` but not in `other`.
    pub fn subtract(&self, other: &ExtentSet) -> ExtentSet {
        let mut out = ExtentSet::new();
        let mut j = 0;
        for &(start, end) in &self.ranges {
            let mut cursor = start;
            // Skip ranges of `other` wholly before this one; they cannot affect later ones either.
            while j < other.ranges.len() && other.ranges[j].1 <= cursor {
                j += 1;
            }
            let mut k = j;
            while cursor < end && k < other.ranges.len() && other.ranges[k].0 < end {
                let (os, oe) = other.ranges[k];
                if os > cursor {
                    out.push_sorted(cursor, os);
                }
                cursor = cursor.max(oe);
                k += 1;
            }
            if cursor < end {
                out.push_sorted(cursor, end);
            }
        }
        out
    }

    /// The part of the set inside `offset..offset + len`.
    pub fn clip(&self, offset: u64, len: u64) -> ExtentSet {
        let (lo, hi) = (offset, offset.saturating_add(len));
        let mut out = ExtentSet::new();
        let first = self.ranges.partition_point(|&(_, e)| e <= lo);
        for &(s, e) in &self.ranges[first..] {
            if s >= hi {
                break;
            }
            let (s, e) = (s.max(lo), e.min(hi));
            if s < e {
                out.push_sorted(s, e);
            }
        }
        out
    }

    /// Sum of the lengths of all ranges.
    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|&(s, e)| e - s).sum()
    }

    /// Whether byte `offset` is in the set.
    pub fn contains(&self, offset: u64) -> bool {
        let i = self.ranges.partition_point(|&(_, e)| e <= offset);
        self.ranges.get(i).is_some_and(|&(s, _)| s <= offset)
    }

    pub fn iter(&self) -> impl Iterator<Item = Extent> + '_ {
        self.ranges.iter().map(|&(s, e)| Extent { offset: s, len: e - s })
    }

    /// Every range widened to whole granules: start rounded down and end rounded up to a multiple
    /// of `granule`. Used to turn byte ranges into the clusters a dirty bitmap or a copy works
    /// in. A `granule` of 0 or 1 leaves the set as it is. An end that would round past
    /// `u64::MAX` stops at `u64::MAX`.
    pub fn align_out(&self, granule: u64) -> ExtentSet {
        if granule <= 1 {
            return self.clone();
        }
        let mut out = ExtentSet::new();
        for &(s, e) in &self.ranges {
            let start = s - s % granule;
            let end = match e % granule {
                0 => e,
                rem => e.saturating_add(granule - rem),
            };
            // Widening keeps the order of starts, so push_sorted still applies; it coalesces
            // ranges that now touch or overlap.
            out.push_sorted(start, end);
        }
        out
    }

    /// The ranges split into pieces of at most `max_len` bytes, in order, for I/O requests of
    /// bounded size. Each range is cut from its start; pieces never span two ranges. A
    /// `max_len` of 0 means no limit.
    pub fn chunks(&self, max_len: u64) -> impl Iterator<Item = Extent> + '_ {
        let max_len = if max_len == 0 { u64::MAX } else { max_len };
        self.ranges.iter().flat_map(move |&(s, e)| {
            let mut cursor = s;
            std::iter::from_fn(move || {
                if cursor >= e {
                    return None;
                }
                let len = (e - cursor).min(max_len);
                let piece = Extent { offset: cursor, len };
                cursor += len;
                Some(piece)
            })
        })
    }

    /// Appends a range that starts at or after the start of the last range (the output of every
    /// merge above), coalescing with the last range when they overlap or touch.
    fn push_sorted(&mut self, start: u64, end: u64) {
        debug_assert!(start < end);
        debug_assert!(self.ranges.last().is_none_or(|&(s, _)| s <= start));
        match self.ranges.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => self.ranges.push((start, end)),
        }
    }
}

impl FromIterator<Extent> for ExtentSet {
    fn from_iter<I: IntoIterator<Item = Extent>>(iter: I) -> ExtentSet {
        let mut set = ExtentSet::new();
        set.extend(iter);
        set
    }
}

impl Extend<Extent> for ExtentSet {
    fn extend<I: IntoIterator<Item = Extent>>(&mut self, iter: I) {
        for extent in iter {
            self.insert(extent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The naive model: one bool per byte of a small universe.
    const UNIVERSE: u64 = 200;

    fn model(set: &ExtentSet) -> Vec<bool> {
        let mut bits = vec![false; UNIVERSE as usize];
        for extent in set.iter() {
            for b in extent.offset..extent.end() {
                bits[b as usize] = true;
            }
        }
        bits
    }

    fn model_of(extents: &[Extent]) -> Vec<bool> {
        let mut bits = vec![false; UNIVERSE as usize];
        for extent in extents {
            for b in extent.offset..extent.end() {
                bits[b as usize] = true;
            }
        }
        bits
    }

    fn check_invariants(set: &ExtentSet) {
        for &(s, e) in &set.ranges {
            assert!(s < e, "empty range in {set:?}");
        }
        for pair in set.ranges.windows(2) {
            assert!(pair[0].1 < pair[1].0, "ranges overlap or touch in {set:?}");
        }
    }

    fn extents() -> impl Strategy<Value = Vec<Extent>> {
        proptest::collection::vec(
            (0..UNIVERSE)
                .prop_flat_map(|offset| (Just(offset), 0..=(UNIVERSE - offset)))
                .prop_map(|(offset, len)| Extent::new(offset, len)),
            0..12,
        )
    }

    proptest! {
        #[test]
        fn insert_matches_model(list in extents()) {
            let set: ExtentSet = list.iter().copied().collect();
            check_invariants(&set);
            prop_assert_eq!(model(&set), model_of(&list));
            prop_assert_eq!(set.total_bytes(), model_of(&list).iter().filter(|&&b| b).count() as u64);
        }

        #[test]
        fn union_matches_model(a in extents(), b in extents()) {
            let (sa, sb): (ExtentSet, ExtentSet) = (a.iter().copied().collect(), b.iter().copied().collect());
            let u = sa.union(&sb);
            check_invariants(&u);
            let expected: Vec<bool> = model(&sa).iter().zip(model(&sb)).map(|(x, y)| *x || y).collect();
            prop_assert_eq!(model(&u), expected);
            // Canonical form: the union equals inserting everything into one set.
            let all: ExtentSet = a.iter().chain(b.iter()).copied().collect();
            prop_assert_eq!(u, all);
        }

        #[test]
        fn intersect_matches_model(a in extents(), b in extents()) {
            let (sa, sb): (ExtentSet, ExtentSet) = (a.iter().copied().collect(), b.iter().copied().collect());
            let i = sa.intersect(&sb);
            check_invariants(&i);
            let expected: Vec<bool> = model(&sa).iter().zip(model(&sb)).map(|(x, y)| *x && y).collect();
            prop_assert_eq!(model(&i), expected);
        }

        #[test]
        fn subtract_matches_model(a in extents(), b in extents()) {
            let (sa, sb): (ExtentSet, ExtentSet) = (a.iter().copied().collect(), b.iter().copied().collect());
            let d = sa.subtract(&sb);
            check_invariants(&d);
            let expected: Vec<bool> = model(&sa).iter().zip(model(&sb)).map(|(x, y)| *x && !y).collect();
            prop_assert_eq!(model(&d), expected);
        }

        #[test]
        fn align_out_matches_model(a in extents(), granule in 1u64..40) {
            let sa: ExtentSet = a.iter().copied().collect();
            let aligned = sa.align_out(granule);
            check_invariants(&aligned);
            // A granule is in the result iff any of its bytes is in the input.
            let bits = model(&sa);
            let universe_granules = UNIVERSE.div_ceil(granule);
            for g in 0..universe_granules {
                let lo = g * granule;
                let hi = (lo + granule).min(UNIVERSE);
                let any = (lo..hi).any(|b| bits[b as usize]);
                for b in lo..lo + granule {
                    prop_assert_eq!(aligned.contains(b), any, "byte {} granule {}", b, granule);
                }
            }
            for r in aligned.iter() {
                prop_assert_eq!(r.offset % granule, 0);
                prop_assert_eq!(r.end() % granule, 0);
            }
        }

        #[test]
        fn clip_matches_model(a in extents(), offset in 0..UNIVERSE, len in 0..UNIVERSE) {
            let sa: ExtentSet = a.iter().copied().collect();
            let clipped = sa.clip(offset, len);
            check_invariants(&clipped);
            let bits = model(&sa);
            let expected: Vec<bool> =
                (0..UNIVERSE).map(|b| bits[b as usize] && b >= offset && b < offset + len).collect();
            prop_assert_eq!(model(&clipped), expected);
        }

        #[test]
        fn chunks_cover_exactly(a in extents(), max_len in 0u64..50) {
            let sa: ExtentSet = a.iter().copied().collect();
            let pieces: Vec<Extent> = sa.chunks(max_len).collect();
            for p in &pieces {
                prop_assert!(p.len > 0);
                if max_len > 0 {
                    prop_assert!(p.len <= max_len);
                }
            }
            for pair in pieces.windows(2) {
                prop_assert!(pair[0].end() <= pair[1].offset);
            }
            let rebuilt: ExtentSet = pieces.into_iter().collect();
            prop_assert_eq!(rebuilt, sa);
        }
    }

    #[test]
    fn ends_saturate_instead_of_wrapping() {
        let mut set = ExtentSet::new();
        set.insert(Extent::new(u64::MAX - 10, 100));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![Extent::new(u64::MAX - 10, 10)]);
        let aligned = ExtentSet::from_range(u64::MAX - 10, 5).align_out(1 << 16);
        assert_eq!(aligned.iter().last().map(|e| e.end()), Some(u64::MAX));
        assert_eq!(set.clip(u64::MAX - 5, u64::MAX).total_bytes(), 5);
    }

    #[test]
    fn touching_ranges_coalesce() {
        let set: ExtentSet = [Extent::new(0, 10), Extent::new(20, 5), Extent::new(10, 10)].into_iter().collect();
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![Extent::new(0, 25)]);
    }

    #[test]
    fn align_out_to_bitmap_granules() {
        // Two 4 KiB writes in one 64 KiB granule and one in another become two granules.
        let k = 1024;
        let writes: ExtentSet =
            [Extent::new(0, 4 * k), Extent::new(8 * k, 4 * k), Extent::new(1024 * k, 4 * k)].into_iter().collect();
        let granules = writes.align_out(64 * k);
        assert_eq!(granules.iter().collect::<Vec<_>>(), vec![Extent::new(0, 64 * k), Extent::new(1024 * k, 64 * k)]);
    }
}
