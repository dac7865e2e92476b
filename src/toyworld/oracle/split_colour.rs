//! The colour split of a foreground component: objects that touch are usually of different
//! looks, so the component's core pixels are clustered into tones, tones interleaved as one
//! pattern's are grouped, and each group's connected pieces become candidate objects; adjacent
//! candidates whose union fits a shape clearly better are merged back.

use super::distance::edt;
use super::grid::{components, mask_of, neighbours4};
use super::lab::dist3;
use super::shape::{fit_set, parts_fit};
use super::tones::tone_centres;


/// Tone groups touching along at least this share of the smaller one's perimeter are one
/// object; from MERGE_RATIO_LOW up, only when their union fits a shape as well as they do apart.
const MERGE_RATIO_HIGH: f32 = 0.5;
const MERGE_RATIO_LOW: f32 = 0.2;

/// Splits a component by colour: its core pixels (off the anti-aliased edge) are clustered
/// into tones; tones that touch along a large share of the smaller one's perimeter (at least
/// 20%: the two tones of one patterned object) form one group; each group's connected pieces
/// are candidate objects (edge pixels join the group of the nearest core pixel). Adjacent
/// candidates whose union fits a shape clearly better (by 0.05) are merged back.
pub(super) fn split_by_colour(comp: &[usize], lab: &[[f32; 3]], w: usize, h: usize, min_area: usize) -> Vec<Vec<usize>> {
    let inside = mask_of(comp, w, h);
    let depth = edt(&inside, w, h);
    let core: Vec<usize> = comp.iter().copied().filter(|&p| depth[p] > 1.5).collect();
    if core.len() < 40 {
        return vec![comp.to_vec()];
    }
    let points: Vec<[f32; 3]> = core.iter().map(|&p| lab[p]).collect();
    let centres = tone_centres(&points);
    if centres.len() < 2 {
        return vec![comp.to_vec()];
    }
    let d = dist3;
    const NONE: usize = usize::MAX;
    let mut tone = vec![NONE; w * h];
    for &p in &core {
        tone[p] = (0..centres.len()).min_by(|&a, &b| d(lab[p], centres[a]).total_cmp(&d(lab[p], centres[b]))).unwrap();
    }
    let k = centres.len();
    // Thin clusters (most of their pixels next to another cluster: mixtures along contact lines,
    // blurred edges, intermediate shades of a blurred pattern) take the tone of the nearest
    // solid cluster, so they neither bridge two objects nor separate one object's tones.
    let mut count = vec![0usize; k];
    let mut rim = vec![0usize; k];
    for &p in &core {
        let (x, y) = (p % w, p / w);
        let nbrs = [(x > 0).then(|| p - 1), (x + 1 < w).then(|| p + 1), (y > 0).then(|| p - w), (y + 1 < h).then(|| p + w)];
        count[tone[p]] += 1;
        if nbrs.iter().flatten().any(|&q| tone[q] != NONE && tone[q] != tone[p]) {
            rim[tone[p]] += 1;
        }
    }
    let thin: Vec<bool> = (0..k).map(|i| rim[i] as f32 > 0.75 * count[i] as f32).collect();
    if thin.iter().any(|&t| !t) && thin.iter().any(|&t| t) {
        let mut queue = std::collections::VecDeque::new();
        let mut pending = vec![false; w * h];
        for &p in &core {
            if thin[tone[p]] {
                pending[p] = true;
            } else {
                queue.push_back(p);
            }
        }
        while let Some(p) = queue.pop_front() {
            for q in neighbours4(p, w, h) {
                if pending[q] {
                    pending[q] = false;
                    tone[q] = tone[p];
                    queue.push_back(q);
                }
            }
        }
    }
    // Agglomerative: repeatedly merge the two tone groups that touch along the largest share of
    // the smaller one's perimeter, while that share is at least 20% (noise splitting one tone
    // into interleaved clusters is merged first, then the tones of one pattern).
    let mut group: Vec<usize> = (0..k).collect();
    let mut rejected: Vec<(usize, usize)> = Vec::new();
    loop {
        let mut contact = vec![vec![0usize; k]; k];
        let mut perimeter = vec![0usize; k];
        for &p in &core {
            let gp = group[tone[p]];
            let (x, y) = (p % w, p / w);
            let nbrs = [(x > 0).then(|| p - 1), (x + 1 < w).then(|| p + 1), (y > 0).then(|| p - w), (y + 1 < h).then(|| p + w)];
            for q in nbrs {
                let gq = q.map(|q| tone[q]).map(|t| if t == NONE { NONE } else { group[t] }).unwrap_or(NONE);
                if gq != gp {
                    perimeter[gp] += 1;
                    if gq != NONE {
                        contact[gp][gq] += 1;
                    }
                }
            }
        }
        let mut cands: Vec<(usize, usize, f32)> = Vec::new();
        for i in 0..k {
            for j in i + 1..k {
                let c = contact[i][j];
                if c == 0 || rejected.contains(&(i, j)) {
                    continue;
                }
                let ratio = c as f32 / perimeter[i].min(perimeter[j]).max(1) as f32;
                if ratio >= MERGE_RATIO_LOW {
                    cands.push((i, j, ratio));
                }
            }
        }
        cands.sort_by(|x, y| y.2.total_cmp(&x.2));
        let mut merged = None;
        for (i, j, ratio) in cands {
            // Interleaved tones are one object; a shorter contact needs the shape evidence:
            // the union must fit a shape about as well as the two groups apart.
            let ok = ratio >= MERGE_RATIO_HIGH || {
                let gi: Vec<usize> = core.iter().copied().filter(|&p| group[tone[p]] == i).collect();
                let gj: Vec<usize> = core.iter().copied().filter(|&p| group[tone[p]] == j).collect();
                let mut union: Vec<usize> = gi.iter().chain(gj.iter()).copied().collect();
                union.sort_unstable();
                fit_set(w, h, &union).best().1 + 0.02 >= parts_fit(w, h, &[&gi, &gj])
            };
            if ok {
                merged = Some((i, j));
                break;
            }
            rejected.push((i, j));
        }
        let Some((i, j)) = merged else { break };
        for g in group.iter_mut() {
            if *g == j {
                *g = i;
            }
        }
        rejected.retain(|&(x, y)| x != i && y != i && x != j && y != j);
    }
    let groups = group;
    if groups.iter().all(|&g| g == groups[0]) {
        return vec![comp.to_vec()];
    }
    // Group label of every pixel: core by colour, the rest from the nearest core pixel (BFS).
    let mut label = vec![NONE; w * h];
    let mut queue = std::collections::VecDeque::new();
    for &p in &core {
        label[p] = groups[tone[p]];
        queue.push_back(p);
    }
    while let Some(p) = queue.pop_front() {
        for q in neighbours4(p, w, h) {
            if inside[q] && label[q] == NONE {
                label[q] = label[p];
                queue.push_back(q);
            }
        }
    }
    // Pieces: connected components of each group.
    let mut parts: Vec<Vec<usize>> = Vec::new();
    let mut gids: Vec<usize> = groups.clone();
    gids.sort_unstable();
    gids.dedup();
    for g in gids {
        let m: Vec<bool> = (0..w * h).map(|p| inside[p] && label[p] == g).collect();
        parts.extend(components(&m, w, h));
    }
    merge_adjacent(parts, w, h, min_area)
}

/// Merges adjacent parts: a part under `min_area` joins the neighbour it touches most; two
/// parts merge when their union fits a shape better than they do apart by 0.05.
fn merge_adjacent(mut parts: Vec<Vec<usize>>, w: usize, h: usize, min_area: usize) -> Vec<Vec<usize>> {
    loop {
        let mut owner = vec![usize::MAX; w * h];
        for (k, part) in parts.iter().enumerate() {
            for &p in part {
                owner[p] = k;
            }
        }
        let n = parts.len();
        let mut touch = vec![vec![0usize; n]; n];
        for (k, part) in parts.iter().enumerate() {
            for &p in part {
                for q in neighbours4(p, w, h) {
                    let o = owner[q];
                    if o != usize::MAX && o != k {
                        touch[k][o] += 1;
                    }
                }
            }
        }
        // Smallest part under min_area first.
        let small = (0..n).filter(|&k| parts[k].len() < min_area).min_by_key(|&k| parts[k].len());
        let pair = if let Some(k) = small {
            (0..n).filter(|&o| touch[k][o] > 0).max_by_key(|&o| touch[k][o]).map(|o| (o, k))
        } else {
            let mut best: Option<(usize, usize, f32)> = None;
            for a in 0..n {
                for b in a + 1..n {
                    if touch[a][b] == 0 {
                        continue;
                    }
                    let mut union: Vec<usize> = parts[a].iter().chain(parts[b].iter()).copied().collect();
                    union.sort_unstable();
                    let gain = fit_set(w, h, &union).best().1 - parts_fit(w, h, &[&parts[a], &parts[b]]);
                    if gain > 0.05 && best.is_none_or(|x| gain > x.2) {
                        best = Some((a, b, gain));
                    }
                }
            }
            best.map(|(a, b, _)| (a, b))
        };
        let Some((a, b)) = pair else { break };
        let (a, b) = (a.min(b), a.max(b));
        let pb = parts.remove(b);
        parts[a].extend(pb);
        parts[a].sort_unstable();
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: usize = 32;
    const H: usize = 18;

    fn rect(x0: usize, x1: usize, y0: usize, y1: usize) -> Vec<usize> {
        (0..W * H).filter(|&p| (x0..x1).contains(&(p % W)) && (y0..y1).contains(&(p / W))).collect()
    }

    fn union(a: &[usize], b: &[usize]) -> Vec<usize> {
        let mut u: Vec<usize> = a.iter().chain(b).copied().collect();
        u.sort_unstable();
        u
    }

    /// A Lab image: `a_lab` on `a`, `b_lab` elsewhere.
    fn lab_image(a: &[usize], a_lab: [f32; 3], b_lab: [f32; 3]) -> Vec<[f32; 3]> {
        (0..W * H).map(|p| if a.contains(&p) { a_lab } else { b_lab }).collect()
    }

    #[test]
    fn touching_squares_of_two_colours_are_split_exactly() {
        let (a, b) = (rect(2, 14, 3, 15), rect(14, 26, 3, 15));
        let lab = lab_image(&a, [50.0, 60.0, 40.0], [60.0, -50.0, 30.0]);
        let mut parts = split_by_colour(&union(&a, &b), &lab, W, H, 16);
        parts.sort();
        assert_eq!(parts, vec![a, b]);
    }

    #[test]
    fn a_striped_object_stays_whole() {
        // 2-px vertical stripes of two tones: interleaved tones are one object.
        let comp = rect(4, 20, 1, 17);
        let stripes: Vec<usize> = comp.iter().copied().filter(|p| (p % W / 2) % 2 == 0).collect();
        let lab = lab_image(&stripes, [30.0, 40.0, -40.0], [80.0, 0.0, 70.0]);
        assert_eq!(split_by_colour(&comp, &lab, W, H, 16), vec![comp]);
    }

    #[test]
    fn a_component_with_a_small_core_is_not_split() {
        // Two 5x5 squares: 2 x 9 core pixels, under 40.
        let (a, b) = (rect(2, 7, 2, 7), rect(7, 12, 2, 7));
        let lab = lab_image(&a, [50.0, 60.0, 40.0], [60.0, -50.0, 30.0]);
        let comp = union(&a, &b);
        assert_eq!(split_by_colour(&comp, &lab, W, H, 4), vec![comp]);
    }

    #[test]
    fn halves_of_one_square_are_merged_back() {
        let (l, r) = (rect(4, 10, 2, 14), rect(10, 16, 2, 14));
        assert_eq!(merge_adjacent(vec![l.clone(), r.clone()], W, H, 16), vec![union(&l, &r)]);
    }

    #[test]
    fn a_small_part_joins_the_neighbour_it_touches_most() {
        // A 10-px crumb between two squares, touching `a` along 4 px and `b` along 3: it goes to `a`.
        let (a, b) = (rect(2, 12, 2, 12), rect(15, 25, 2, 12));
        let crumb = union(&rect(12, 15, 5, 8), &[8 * W + 12]);
        let out = merge_adjacent(vec![a.clone(), b.clone(), crumb.clone()], W, H, 16);
        assert_eq!(out, vec![union(&a, &crumb), b]);
    }

    #[test]
    fn separate_squares_are_not_merged() {
        let (a, b) = (rect(2, 12, 2, 12), rect(14, 24, 2, 12));
        assert_eq!(merge_adjacent(vec![a.clone(), b.clone()], W, H, 16), vec![a, b]);
        // Touching squares fit better apart than as one 2:1 rectangle.
        let (a, b) = (rect(2, 12, 2, 12), rect(12, 22, 2, 12));
        assert_eq!(merge_adjacent(vec![a.clone(), b.clone()], W, H, 16), vec![a, b]);
    }
}
