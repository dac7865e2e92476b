//! Ring cutting: a ring is the only class with a hole, and a ring's hole is round with a known
//! ratio to its outer radius, so a round hole in a foreground part locates a ring; what lies
//! beyond that ring's outer radius is another object touching it.

use super::grid::{components, enclosed_regions, mask_of};

/// Cuts rings out of a part: a round hole (the only class with one) of radius `r_h` gives a
/// ring centred on it with outer radius `r_h / 0.52`; when the part's pixels beyond that radius
/// (plus 1.5 px) form a piece of at least `min_area` and a quarter of the ring, they are
/// another object touching the ring. Repeats for every round hole.
pub(super) fn split_rings(part: &[usize], w: usize, h: usize, min_area: usize) -> Vec<Vec<usize>> {
    let inside = mask_of(part, w, h);
    let mut holes: Vec<Vec<usize>> = enclosed_regions(&inside, w, h).into_iter().filter(|r| r.len() >= 12).collect();
    holes.sort_by_key(|r| std::cmp::Reverse(r.len()));
    let mut rest: Vec<usize> = part.to_vec();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for hole in holes {
        let n = hole.len() as f32;
        let (mut cx, mut cy) = (0f32, 0f32);
        for &p in &hole {
            cx += (p % w) as f32 + 0.5;
            cy += (p / w) as f32 + 0.5;
        }
        cx /= n;
        cy /= n;
        let rh = (n / std::f32::consts::PI).sqrt();
        let far = hole
            .iter()
            .map(|&p| (((p % w) as f32 + 0.5 - cx).powi(2) + ((p / w) as f32 + 0.5 - cy).powi(2)).sqrt())
            .fold(0f32, f32::max);
        if far > 1.6 * rh + 1.0 {
            continue; // not round: background enclosed between objects
        }
        let r = rh / 0.52 + 1.5;
        let dist = |p: usize| (((p % w) as f32 + 0.5 - cx).powi(2) + ((p / w) as f32 + 0.5 - cy).powi(2)).sqrt();
        let (ring, beyond): (Vec<usize>, Vec<usize>) = rest.iter().partition(|&&p| dist(p) <= r);
        let pieces = components(&mask_of(&beyond, w, h), w, h);
        let big: Vec<&Vec<usize>> =
            pieces.iter().filter(|c| c.len() >= min_area && c.len() * 4 >= ring.len()).collect();
        if big.is_empty() {
            continue;
        }
        // Small pieces beyond the radius stay with the ring.
        let mut ring = ring;
        let mut others: Vec<usize> = Vec::new();
        for c in &pieces {
            if big.iter().any(|b| std::ptr::eq(*b, c)) {
                others.extend(c);
            } else {
                ring.extend(c);
            }
        }
        ring.sort_unstable();
        others.sort_unstable();
        out.push(ring);
        rest = others;
    }
    if !rest.is_empty() {
        if out.is_empty() {
            out.push(rest);
        } else {
            out.extend(components(&mask_of(&rest, w, h), w, h));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: usize = 44;

    fn centre_dist(p: usize, c: (f32, f32)) -> f32 {
        (((p % W) as f32 + 0.5 - c.0).powi(2) + ((p / W) as f32 + 0.5 - c.1).powi(2)).sqrt()
    }

    /// An annulus of the world's proportions (inner radius 0.52 of the outer).
    fn ring(c: (f32, f32), outer: f32) -> Vec<usize> {
        (0..W * W).filter(|&p| centre_dist(p, c) > 0.52 * outer && centre_dist(p, c) <= outer).collect()
    }

    fn rect(x0: usize, x1: usize, y0: usize, y1: usize) -> Vec<usize> {
        (0..W * W).filter(|&p| (x0..x1).contains(&(p % W)) && (y0..y1).contains(&(p / W))).collect()
    }

    fn union(a: &[usize], b: &[usize]) -> Vec<usize> {
        let mut u: Vec<usize> = a.iter().chain(b).copied().collect();
        u.sort_unstable();
        u.dedup();
        u
    }

    #[test]
    fn a_lone_ring_is_left_alone() {
        let r = ring((16.0, 16.0), 10.0);
        assert_eq!(split_rings(&r, W, W, 16), vec![r]);
    }

    #[test]
    fn an_object_touching_a_ring_is_cut_off() {
        let c = (16.0, 16.0);
        let r = ring(c, 10.0);
        let square = rect(26, 38, 10, 22);
        let part = union(&r, &square);
        let out = split_rings(&part, W, W, 16);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(union(&out[0], &out[1]), part, "the pieces partition the part");
        assert!(out[0].iter().all(|p| !out[1].contains(p)));
        // The first piece is the ring (with the square's sliver inside its outer radius); the
        // second holds only square pixels, all of those well beyond the ring.
        assert!(r.iter().all(|p| out[0].contains(p)));
        assert!(out[1].iter().all(|p| square.contains(p)));
        assert!(square.iter().filter(|&&p| centre_dist(p, c) > 13.0).all(|p| out[1].contains(p)));
    }

    #[test]
    fn long_or_small_holes_are_not_rings() {
        // A frame around a 30x4 hole (not round: background enclosed between objects) with a
        // square against it, and a square with a 3x3 hole (under 12 px): nothing is cut.
        let frame: Vec<usize> = rect(2, 36, 2, 10).into_iter().filter(|p| !rect(4, 34, 4, 8).contains(p)).collect();
        let part = union(&frame, &rect(36, 44, 2, 12));
        assert_eq!(split_rings(&part, W, W, 16), vec![part]);
        let holed: Vec<usize> = rect(10, 20, 20, 30).into_iter().filter(|p| !rect(14, 17, 24, 27).contains(p)).collect();
        let part = union(&holed, &rect(20, 30, 22, 28));
        assert_eq!(split_rings(&part, W, W, 16), vec![part]);
    }
}
