//! Pixel sets on a `w` x `h` grid (row-major indices `y * w + x`): neighbours, connected
//! components, the background holes a set encloses, and the gap between two sets. These are the
//! primitives every stage of the segmenter builds its regions from.

/// The 4-connected neighbours of pixel `p` in a `w` x `h` image.
pub(super) fn neighbours4(p: usize, w: usize, h: usize) -> impl Iterator<Item = usize> {
    let (x, y) = (p % w, p / w);
    [(x > 0).then(|| p - 1), (x + 1 < w).then(|| p + 1), (y > 0).then(|| p - w), (y + 1 < h).then(|| p + w)].into_iter().flatten()
}

/// The background regions (4-connected) enclosed by `inside`: not touching the image border.
pub(super) fn enclosed_regions(inside: &[bool], w: usize, h: usize) -> Vec<Vec<usize>> {
    let mut seen = vec![false; w * h];
    let mut out = Vec::new();
    for start in 0..w * h {
        if inside[start] || seen[start] {
            continue;
        }
        let mut region = Vec::new();
        let mut touches_border = false;
        let mut stack = vec![start];
        seen[start] = true;
        while let Some(p) = stack.pop() {
            region.push(p);
            let (x, y) = (p % w, p / w);
            if x == 0 || y == 0 || x == w - 1 || y == h - 1 {
                touches_border = true;
            }
            for q in neighbours4(p, w, h) {
                if !inside[q] && !seen[q] {
                    seen[q] = true;
                    stack.push(q);
                }
            }
        }
        if !touches_border {
            out.push(region);
        }
    }
    out
}

/// Fills background holes of a component that are smaller than `max_hole` pixels (noise);
/// large holes (a ring's) stay. Returns the filled pixel set.
pub(super) fn fill_small_holes(comp: &[usize], w: usize, h: usize, max_hole: usize) -> Vec<usize> {
    let mut inside = vec![false; w * h];
    for &p in comp {
        inside[p] = true;
    }
    let mut filled = comp.to_vec();
    for hole in enclosed_regions(&inside, w, h) {
        if hole.len() < max_hole {
            filled.extend(hole);
        }
    }
    filled.sort_unstable();
    filled
}

/// Connected components (8-connectivity) of `mask`, each a sorted list of pixel indices.
pub(super) fn components(mask: &[bool], w: usize, h: usize) -> Vec<Vec<usize>> {
    let mut seen = vec![false; w * h];
    let mut out = Vec::new();
    for start in 0..w * h {
        if !mask[start] || seen[start] {
            continue;
        }
        let mut comp = Vec::new();
        let mut stack = vec![start];
        seen[start] = true;
        while let Some(p) = stack.pop() {
            comp.push(p);
            let (x, y) = ((p % w) as i64, (p / w) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let q = ny as usize * w + nx as usize;
                    if mask[q] && !seen[q] {
                        seen[q] = true;
                        stack.push(q);
                    }
                }
            }
        }
        comp.sort_unstable();
        out.push(comp);
    }
    out
}

/// Cuts rings out of a part: a round hole (the only class with one) of radius `r_h` gives a

/// Smallest distance (px) between two pixel sets.
pub(super) fn gap(a: &[usize], b: &[usize], w: usize) -> f32 {
    let mut best = f32::MAX;
    for &p in a {
        let (px, py) = ((p % w) as f32, (p / w) as f32);
        for &q in b {
            let (qx, qy) = ((q % w) as f32, (q / w) as f32);
            best = best.min((px - qx).powi(2) + (py - qy).powi(2));
        }
    }
    best.sqrt()
}

/// A `w` x `h` mask, `true` at `pixels`.
pub(super) fn mask_of(pixels: &[usize], w: usize, h: usize) -> Vec<bool> {
    let mut mask = vec![false; w * h];
    for &p in pixels {
        mask[p] = true;
    }
    mask
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The pixels of `rows` (one string per row, `#` = in the set).
    pub(in crate::toyworld::oracle) fn pixels(rows: &[&str]) -> (Vec<usize>, usize, usize) {
        let (w, h) = (rows[0].len(), rows.len());
        let mut v = Vec::new();
        for (y, r) in rows.iter().enumerate() {
            assert_eq!(r.len(), w, "ragged picture");
            v.extend(r.bytes().enumerate().filter(|(_, c)| *c == b'#').map(|(x, _)| y * w + x));
        }
        (v, w, h)
    }

    #[test]
    fn neighbours_at_corner_edge_and_inside() {
        let (w, h) = (4, 3);
        let mut corner: Vec<usize> = neighbours4(0, w, h).collect();
        corner.sort();
        assert_eq!(corner, vec![1, 4]);
        let mut edge: Vec<usize> = neighbours4(2, w, h).collect();
        edge.sort();
        assert_eq!(edge, vec![1, 3, 6]);
        let mut inner: Vec<usize> = neighbours4(5, w, h).collect();
        inner.sort();
        assert_eq!(inner, vec![1, 4, 6, 9]);
        let mut last: Vec<usize> = neighbours4(11, w, h).collect();
        last.sort();
        assert_eq!(last, vec![7, 10]);
    }

    #[test]
    fn components_are_eight_connected_and_sorted() {
        let (px, w, h) = pixels(&[
            "##....", //
            "..#..#", //
            "...#.#", //
            "......", //
            "#.....",
        ]);
        let comps = components(&mask_of(&px, w, h), w, h);
        // The diagonal chain from (0,0) is one component; the right column another; the lone
        // pixel a third; in order of their first pixel.
        assert_eq!(comps, vec![vec![0, 1, 8, 15], vec![11, 17], vec![24]]);
    }

    #[test]
    fn enclosed_regions_use_four_connected_background() {
        // A diamond wall closed only diagonally still encloses its centre (the background is
        // 4-connected); the U open to the border encloses nothing.
        let (px, w, h) = pixels(&[
            "........", //
            "..#.....", //
            ".#.#..#.", //
            "..#...#.", //
            "......#.", //
            "....###.", //
        ]);
        let holes = enclosed_regions(&mask_of(&px, w, h), w, h);
        assert_eq!(holes, vec![vec![2 * w + 2]]);
    }

    #[test]
    fn small_holes_are_filled_large_ones_kept() {
        // A 1-px hole at (2, 2) and a 3-px hole at (5..=7, 2).
        let (px, w, h) = pixels(&[
            "..........", //
            ".########.", //
            ".#.##...#.", //
            ".########.", //
            "..........",
        ]);
        let filled = fill_small_holes(&px, w, h, 3);
        let mut want = px.clone();
        want.push(2 * w + 2);
        want.sort();
        assert_eq!(filled, want, "only the 1-px hole is under 3 px");
        let mut all = want.clone();
        all.extend([2 * w + 5, 2 * w + 6, 2 * w + 7]);
        all.sort();
        assert_eq!(fill_small_holes(&px, w, h, 4), all);
    }

    #[test]
    fn gap_is_the_smallest_pixel_distance() {
        let w = 10;
        assert_eq!(gap(&[0], &[4 * w + 3], w), 5.0);
        assert_eq!(gap(&[0, 9], &[w + 8, 5 * w], w), 2f32.sqrt());
        assert_eq!(gap(&[3], &[3], w), 0.0);
    }

    #[test]
    fn mask_of_marks_exactly_the_pixels() {
        assert_eq!(mask_of(&[0, 3, 3], 2, 2), vec![true, false, false, true]);
    }
}
