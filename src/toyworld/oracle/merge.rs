//! Fragment merging, the segmenter's last step: a soft or blurred object can break into pieces
//! near each other (a thin arm lost to the threshold, a split that went too far); pieces within
//! 3 px are joined when one is a speck or when together they fit a shape better than apart.

use super::grid::gap;
use super::shape::{fit_set, parts_fit};

/// Merges fragments: a part smaller than `min_area` joins its nearest neighbour within 3 px;
/// two parts within 3 px of each other merge when their union fits a shape better than they
/// do apart.
pub(super) fn merge_fragments(mut parts: Vec<Vec<usize>>, w: usize, h: usize, min_area: usize) -> Vec<Vec<usize>> {
    loop {
        let mut best: Option<(usize, usize, f32)> = None;
        for i in 0..parts.len() {
            for j in i + 1..parts.len() {
                let g = gap(&parts[i], &parts[j], w);
                if g > 3.0 {
                    continue;
                }
                let small = parts[i].len().min(parts[j].len()) < min_area;
                let mut union: Vec<usize> = parts[i].iter().chain(parts[j].iter()).copied().collect();
                union.sort_unstable();
                let whole = fit_set(w, h, &union).best().1;
                let apart = parts_fit(w, h, &[&parts[i], &parts[j]]);
                let gain = whole - apart;
                if (small || gain > 0.03) && best.is_none_or(|b| gain > b.2) {
                    best = Some((i, j, gain));
                }
            }
        }
        let Some((i, j, _)) = best else { break };
        let b = parts.remove(j);
        parts[i].extend(b);
        parts[i].sort_unstable();
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: usize = 40;

    fn rect(x0: usize, x1: usize, y0: usize, y1: usize) -> Vec<usize> {
        (0..W * W).filter(|&p| (x0..x1).contains(&(p % W)) && (y0..y1).contains(&(p / W))).collect()
    }

    fn union(a: &[usize], b: &[usize]) -> Vec<usize> {
        let mut u: Vec<usize> = a.iter().chain(b).copied().collect();
        u.sort_unstable();
        u
    }

    #[test]
    fn halves_of_a_square_split_by_a_crack_are_joined() {
        // A 14x14 square missing its column x = 11: two 7x14 / 6x14 bars 2 px apart.
        let (l, r) = (rect(4, 11, 4, 18), rect(12, 18, 4, 18));
        assert_eq!(merge_fragments(vec![l.clone(), r.clone()], W, W, 16), vec![union(&l, &r)]);
    }

    #[test]
    fn a_speck_within_3_px_joins_and_one_farther_does_not() {
        let square = rect(4, 16, 4, 16);
        let near = rect(18, 20, 8, 10); // 3 px right of the square's last column (x = 15)
        let far = rect(4, 6, 20, 22); // 5 px below it
        let out = merge_fragments(vec![square.clone(), near.clone(), far.clone()], W, W, 16);
        assert_eq!(out, vec![union(&square, &near), far]);
    }

    #[test]
    fn separate_shapes_stay_apart() {
        // Two squares 2 px apart fit better alone than as one 2:1 block; a third far away.
        let (a, b, c) = (rect(2, 12, 2, 12), rect(14, 24, 2, 12), rect(2, 12, 26, 36));
        assert_eq!(merge_fragments(vec![a.clone(), b.clone(), c.clone()], W, W, 16), vec![a, b, c]);
    }
}
