//! The exact Euclidean distance transform of a pixel mask (Felzenszwalb and Huttenlocher's
//! separable algorithm). The segmenter reads depth from it three ways: how far a pixel is from a
//! blob's anti-aliased edge (cores, edge sharpening), and where a component narrows into a neck
//! between two touching objects (the basins of its maxima).

/// Exact Euclidean distance transform: for each `true` pixel, the distance to the nearest
/// `false` pixel, the outside of the image counting as `false` (so edge pixels get 1).
pub(super) fn edt(mask: &[bool], w: usize, h: usize) -> Vec<f32> {
    let (pw, ph) = (w + 2, h + 2);
    const INF: f64 = 1e12;
    let mut f = vec![0f64; pw * ph];
    for y in 0..h {
        for x in 0..w {
            if mask[y * w + x] {
                f[(y + 1) * pw + x + 1] = INF;
            }
        }
    }
    let mut col = vec![0f64; pw.max(ph)];
    let mut out = vec![0f64; pw.max(ph)];
    for x in 0..pw {
        for y in 0..ph {
            col[y] = f[y * pw + x];
        }
        dt1d(&col[..ph], &mut out[..ph]);
        for y in 0..ph {
            f[y * pw + x] = out[y];
        }
    }
    for y in 0..ph {
        col[..pw].copy_from_slice(&f[y * pw..(y + 1) * pw]);
        dt1d(&col[..pw], &mut out[..pw]);
        f[y * pw..(y + 1) * pw].copy_from_slice(&out[..pw]);
    }
    let mut d = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            d[y * w + x] = f[(y + 1) * pw + x + 1].sqrt() as f32;
        }
    }
    d
}

/// Felzenszwalb-Huttenlocher 1-D squared distance transform.
fn dt1d(f: &[f64], d: &mut [f64]) {
    let n = f.len();
    let mut v = vec![0usize; n];
    let mut z = vec![0f64; n + 1];
    let mut k = 0usize;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    for q in 1..n {
        loop {
            let p = v[k];
            let s = ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * q as f64 - 2.0 * p as f64);
            if s <= z[k] && k > 0 {
                k -= 1;
                continue;
            }
            if s <= z[k] {
                // k == 0: replace the first parabola.
                v[0] = q;
                z[1] = f64::INFINITY;
                break;
            }
            k += 1;
            v[k] = q;
            z[k] = s;
            z[k + 1] = f64::INFINITY;
            break;
        }
    }
    k = 0;
    for q in 0..n {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        d[q] = ((q as f64 - p as f64).powi(2)) + f[p];
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, pixel by pixel: the nearest `false` pixel, the image's outside (one ring
    /// of `false` pixels around it) included.
    fn brute_force(mask: &[bool], w: usize, h: usize) -> Vec<f32> {
        let (w, h) = (w as i64, h as i64);
        let mut out = vec![0f32; (w * h) as usize];
        for y in 0..h {
            for x in 0..w {
                if !mask[(y * w + x) as usize] {
                    continue;
                }
                let mut best = i64::MAX;
                for yy in -1..=h {
                    for xx in -1..=w {
                        let outside = xx < 0 || yy < 0 || xx >= w || yy >= h;
                        if outside || !mask[(yy * w + xx) as usize] {
                            best = best.min((x - xx).pow(2) + (y - yy).pow(2));
                        }
                    }
                }
                out[(y * w + x) as usize] = (best as f32).sqrt();
            }
        }
        out
    }

    #[test]
    fn single_pixel_and_background_pixels() {
        let (w, h) = (5, 4);
        let mut mask = vec![false; w * h];
        mask[2 * w + 2] = true;
        let d = edt(&mask, w, h);
        assert_eq!(d[2 * w + 2], 1.0);
        assert!(d.iter().enumerate().all(|(p, &v)| p == 2 * w + 2 || v == 0.0));
    }

    #[test]
    fn square_depths_by_construction() {
        // A 5x5 square at x, y in 1..=5 of a 7x7 image: depth = 1 + distance to its nearest side.
        let (w, h) = (7, 7);
        let mask: Vec<bool> = (0..w * h).map(|p| (1..=5).contains(&(p % w)) && (1..=5).contains(&(p / w))).collect();
        let d = edt(&mask, w, h);
        for y in 1..=5usize {
            for x in 1..=5usize {
                let side = (x - 1).min(5 - x).min(y - 1).min(5 - y);
                assert_eq!(d[y * w + x], (side + 1) as f32, "({x}, {y})");
            }
        }
    }

    #[test]
    fn the_image_border_counts_as_outside() {
        let (w, h) = (6, 3);
        let d = edt(&vec![true; w * h], w, h);
        assert_eq!(d[0], 1.0);
        assert_eq!(d[w + 2], 2.0);
        assert_eq!(d[w + w - 1], 1.0);
    }

    #[test]
    fn matches_brute_force_on_irregular_masks() {
        // Deterministic pseudo-random blobs (an LCG), including thin and diagonal structures.
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        for (w, h) in [(1, 1), (1, 9), (9, 1), (13, 11), (20, 17)] {
            for density in [30u32, 60, 85] {
                let mask: Vec<bool> = (0..w * h).map(|_| next() % 100 < density).collect();
                let fast = edt(&mask, w, h);
                let slow = brute_force(&mask, w, h);
                for p in 0..w * h {
                    assert!((fast[p] - slow[p]).abs() < 1e-5, "{w}x{h} density {density} pixel {p}: {} vs {}", fast[p], slow[p]);
                }
            }
        }
    }
}
