//! The geometric split of a foreground component: two objects that touch with no colour edge
//! between them still meet at a neck, a saddle of the distance transform between two maxima.
//! The component is over-segmented into the basins of those maxima (a watershed on depth), and
//! basins are merged back unless the saddle between them is deep or both sides are clearly
//! shapes of their own.

use super::distance::edt;
use super::grid::mask_of;
use super::shape::fit_set;

/// A region of the over-segmentation of a component.
struct Region {
    pixels: Vec<usize>,
    peak: f32,
}

/// Over-segments a component into the basins of the maxima of its distance transform that
/// are separated by a saddle lower than `ratio` times the lower peak (peaks of at least
/// `min_peak` px); returns the regions and, for each adjacent pair, the saddle height.
fn basins(comp: &[usize], w: usize, h: usize, ratio: f32, min_peak: f32) -> (Vec<Region>, Vec<(usize, usize, f32)>) {
    let d = edt(&mask_of(comp, w, h), w, h);
    let mut order: Vec<usize> = comp.to_vec();
    order.sort_by(|&a, &b| d[b].total_cmp(&d[a]).then(a.cmp(&b)));
    // Union-find over pixel labels.
    let mut parent: Vec<usize> = (0..w * h).collect();
    let mut peak = vec![0f32; w * h];
    let mut done = vec![false; w * h];
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    // Pairs of roots kept apart, with their saddle (the highest pixel where they met).
    let mut apart: Vec<(usize, usize, f32)> = Vec::new();
    for &p in &order {
        let level = d[p];
        let (x, y) = ((p % w) as i64, (p / w) as i64);
        let mut roots: Vec<usize> = Vec::new();
        for dy in -1..=1 {
            for dx in -1..=1 {
                let (nx, ny) = (x + dx, y + dy);
                if (dx, dy) == (0, 0) || nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                    continue;
                }
                let q = ny as usize * w + nx as usize;
                if done[q] {
                    let r = find(&mut parent, q);
                    if !roots.contains(&r) {
                        roots.push(r);
                    }
                }
            }
        }
        done[p] = true;
        if roots.is_empty() {
            peak[p] = level;
            continue;
        }
        // Highest peak first; merge the others into it when their separation is shallow.
        roots.sort_by(|&a, &b| peak[b].total_cmp(&peak[a]));
        let main = roots[0];
        parent[p] = main;
        for &r in &roots[1..] {
            let low = peak[r].min(peak[main]);
            let shallow = low < min_peak || level >= ratio * low;
            let (ra, rb) = (find(&mut parent, main), find(&mut parent, r));
            if ra == rb {
                continue;
            }
            if shallow {
                parent[rb] = ra;
                peak[ra] = peak[ra].max(peak[rb]);
            } else {
                apart.push((ra, rb, level));
            }
        }
    }
    // Collect regions.
    let mut index = std::collections::HashMap::new();
    let mut regions: Vec<Region> = Vec::new();
    for &p in comp {
        let r = find(&mut parent, p);
        let k = *index.entry(r).or_insert_with(|| {
            regions.push(Region { pixels: Vec::new(), peak: peak[r] });
            regions.len() - 1
        });
        regions[k].pixels.push(p);
    }
    let mut pairs: Vec<(usize, usize, f32)> = Vec::new();
    for (a, b, level) in apart {
        let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
        if ra == rb {
            continue;
        }
        let (ia, ib) = (index[&ra], index[&rb]);
        let key = (ia.min(ib), ia.max(ib));
        match pairs.iter_mut().find(|q| (q.0, q.1) == key) {
            Some(q) => q.2 = q.2.max(level),
            None => pairs.push((key.0, key.1, level)),
        }
    }
    (regions, pairs)
}

/// Splits a component into objects: basins separated by a deep saddle (below 0.5 of the lower
/// peak) are separate; shallower ones (below 0.85) only when both parts fit a shape well
/// (IoU >= 0.75) and better than their union (by 0.05).
pub(super) fn split_geometric(comp: &[usize], w: usize, h: usize, min_area: usize) -> Vec<Vec<usize>> {
    let (regions, mut pairs) = basins(comp, w, h, 0.85, 2.5);
    if regions.len() == 1 {
        return vec![comp.to_vec()];
    }
    let mut groups: Vec<Option<Vec<usize>>> = regions.iter().map(|r| Some(r.pixels.clone())).collect();
    let mut peaks: Vec<f32> = regions.iter().map(|r| r.peak).collect();
    // Shallowest separations first.
    let mut kept_apart: Vec<(usize, usize)> = Vec::new();
    loop {
        let best = pairs
            .iter()
            .enumerate()
            .filter(|(_, &(a, b, _))| a != b && !kept_apart.contains(&(a.min(b), a.max(b))))
            .map(|(k, &(a, b, s))| (k, s / peaks[a].min(peaks[b])))
            .max_by(|x, y| x.1.total_cmp(&y.1));
        let Some((k, ratio)) = best else { break };
        let (a, b, _) = pairs[k];
        let (ga, gb) = (groups[a].as_ref().unwrap(), groups[b].as_ref().unwrap());
        let mut union: Vec<usize> = ga.iter().chain(gb.iter()).copied().collect();
        union.sort_unstable();
        let big_enough = ga.len() >= min_area && gb.len() >= min_area;
        let separate = big_enough
            && (ratio < 0.5 || {
                let whole = fit_set(w, h, &union).best().1;
                let (fa, fb) = (fit_set(w, h, ga).best().1, fit_set(w, h, gb).best().1);
                let parts = (fa * ga.len() as f32 + fb * gb.len() as f32) / union.len() as f32;
                fa >= 0.75 && fb >= 0.75 && parts >= whole + 0.05
            });
        if separate {
            kept_apart.push((a.min(b), a.max(b)));
            continue;
        }
        groups[a] = Some(union);
        groups[b] = None;
        peaks[a] = peaks[a].max(peaks[b]);
        for q in pairs.iter_mut() {
            if q.0 == b {
                q.0 = a;
            }
            if q.1 == b {
                q.1 = a;
            }
        }
        // Keep the highest saddle per pair.
        let mut merged: Vec<(usize, usize, f32)> = Vec::new();
        for &(x, y, s) in pairs.iter().filter(|q| q.0 != q.1) {
            let key = (x.min(y), x.max(y));
            match merged.iter_mut().find(|m| (m.0, m.1) == key) {
                Some(m) => m.2 = m.2.max(s),
                None => merged.push((key.0, key.1, s)),
            }
        }
        pairs = merged;
        kept_apart.retain(|&(x, y)| x != b && y != b);
    }
    groups.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: usize = 48;
    const H: usize = 32;

    fn disc(cx: f32, cy: f32, r: f32) -> Vec<usize> {
        (0..W * H).filter(|&p| ((p % W) as f32 + 0.5 - cx).powi(2) + ((p / W) as f32 + 0.5 - cy).powi(2) <= r * r).collect()
    }

    fn rect(x0: usize, x1: usize, y0: usize, y1: usize) -> Vec<usize> {
        (0..W * H).filter(|&p| (x0..x1).contains(&(p % W)) && (y0..y1).contains(&(p / W))).collect()
    }

    fn union(parts: &[&[usize]]) -> Vec<usize> {
        let mut u: Vec<usize> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        u.sort_unstable();
        u.dedup();
        u
    }

    /// Discs of radius 7 and 8 joined by a 2-px bar (depth 1 against peaks of 7 and 8; unequal,
    /// so a pixel touching both basins at the bar's end joins the larger's without a tie).
    fn dumbbell() -> (Vec<usize>, Vec<usize>, Vec<usize>) {
        let (a, b) = (disc(10.0, 16.0, 7.0), disc(36.0, 16.0, 8.0));
        let comp = union(&[&a, &b, &rect(16, 31, 15, 17)]);
        (comp, a, b)
    }

    #[test]
    fn basins_of_a_dumbbell_meet_at_the_bar() {
        let (comp, _, _) = dumbbell();
        let (regions, pairs) = basins(&comp, W, H, 0.85, 2.5);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions.iter().map(|r| r.pixels.len()).sum::<usize>(), comp.len());
        let mut peaks: Vec<f32> = regions.iter().map(|r| r.peak).collect();
        peaks.sort_by(f32::total_cmp);
        assert!((peaks[0] - 7.0).abs() <= 1.0 && (peaks[1] - 8.0).abs() <= 1.0, "peaks {peaks:?}");
        assert_eq!(pairs.len(), 1);
        assert!((0..2).contains(&pairs[0].0) && (0..2).contains(&pairs[0].1) && pairs[0].0 != pairs[0].1);
        assert_eq!(pairs[0].2, 1.0, "the saddle is the bar's depth");
    }

    #[test]
    fn a_dumbbell_splits_into_its_discs() {
        let (comp, a, b) = dumbbell();
        let out = split_geometric(&comp, W, H, 16);
        assert_eq!(out.len(), 2);
        assert_eq!(union(&[&out[0], &out[1]]), comp);
        let (ka, kb) = if out[0].contains(&a[a.len() / 2]) { (0, 1) } else { (1, 0) };
        assert!(a.iter().all(|p| out[ka].contains(p)) && b.iter().all(|p| out[kb].contains(p)), "each disc whole in its piece");
    }

    #[test]
    fn convex_shapes_and_small_bumps_stay_whole() {
        let d = disc(20.0, 16.0, 10.0);
        assert_eq!(split_geometric(&d, W, H, 16), vec![d.clone()]);
        // A long bar: one ridge, no neck.
        let bar = rect(4, 40, 10, 18);
        assert_eq!(split_geometric(&bar, W, H, 16), vec![bar.clone()]);
        // A square with a 3x3 knob: the knob's peak (2) is under the 2.5 px minimum.
        let knob = union(&[&rect(4, 20, 4, 20), &rect(20, 23, 10, 13)]);
        assert_eq!(split_geometric(&knob, W, H, 16), vec![knob.clone()]);
    }

    #[test]
    fn pieces_under_the_minimum_area_are_not_split_off() {
        // The same dumbbell with min_area above both discs' areas: kept whole.
        let (comp, a, b) = dumbbell();
        assert!(a.len() < 250 && b.len() < 250);
        let out = split_geometric(&comp, W, H, 250);
        assert_eq!(out.len(), 1);
        assert_eq!(union(&[&out[0]]), comp);
    }
}
