//! Edge sharpening of a foreground part: a blurred object thresholded at a low distance from the
//! background grows by its blur's halo; the renderer's masks count a pixel as the object's when
//! it is at least half covered, and this stage applies the same rule to the halo, reading each
//! edge pixel as a mixture of the background and the object colour just inside it.

use super::distance::edt;
use super::grid::{mask_of, neighbours4};

/// Sharpens a part's edge: a pixel within 2.5 px of the edge whose colour is a mixture of the
/// background and `o`, the colour of the nearest pixel deeper inside, stays only if it is at
/// least half object, `alpha = (p - bg).(o - bg) / |o - bg|^2 >= 0.5` (the coverage rule of
/// the renderer's masks); pixels far from that mixing line (another tone of a patterned
/// object) stay. Undoes the growth of a blurred high-contrast object thresholded at a low
/// distance.
pub(super) fn refine_edges(part: &[usize], colors: &[[f32; 3]], bg: &[[f32; 3]], w: usize, h: usize) -> Vec<usize> {
    let inside = mask_of(part, w, h);
    let depth = edt(&inside, w, h);
    const NONE: usize = usize::MAX;
    let mut source = vec![NONE; w * h];
    let mut queue = std::collections::VecDeque::new();
    for &p in part {
        if depth[p] >= 2.5 {
            source[p] = p;
            queue.push_back(p);
        }
    }
    if queue.len() < 8 {
        return part.to_vec();
    }
    while let Some(p) = queue.pop_front() {
        for q in neighbours4(p, w, h) {
            if inside[q] && source[q] == NONE {
                source[q] = source[p];
                queue.push_back(q);
            }
        }
    }
    let col = |p: usize| [colors[p][0] - bg[p][0], colors[p][1] - bg[p][1], colors[p][2] - bg[p][2]];
    let kept: Vec<usize> = part
        .iter()
        .copied()
        .filter(|&p| {
            if depth[p] >= 2.5 || source[p] == NONE {
                return true;
            }
            let (v, o) = (col(p), col(source[p]));
            let oo = o[0] * o[0] + o[1] * o[1] + o[2] * o[2];
            if oo < 1.0 {
                return true;
            }
            let t = (v[0] * o[0] + v[1] * o[1] + v[2] * o[2]) / oo;
            // Far from the background-to-o line: another tone of the object, not a mixture.
            let perp = [v[0] - t * o[0], v[1] - t * o[1], v[2] - t * o[2]];
            let perp2 = perp[0] * perp[0] + perp[1] * perp[1] + perp[2] * perp[2];
            t >= 0.5 || perp2 > 0.35f32.powi(2) * oo
        })
        .collect();
    if kept.len() * 2 < part.len() {
        part.to_vec()
    } else {
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BG: [f32; 3] = [120.0, 120.0, 120.0];
    const OBJ: [f32; 3] = [120.0, 120.0, 20.0];

    /// A 20x20 grey image holding an object square `lo..hi` ringed by a `halo`-px band coloured
    /// `halo_colour`; returns (part = square and band, colours, background, the square).
    fn scene(lo: usize, hi: usize, halo: usize, halo_colour: [f32; 3]) -> (Vec<usize>, Vec<[f32; 3]>, Vec<[f32; 3]>, Vec<usize>) {
        let w = 20;
        let within = |p: usize, a: usize, b: usize| (a..b).contains(&(p % w)) && (a..b).contains(&(p / w));
        let square: Vec<usize> = (0..w * w).filter(|&p| within(p, lo, hi)).collect();
        let part: Vec<usize> = (0..w * w).filter(|&p| within(p, lo - halo, hi + halo)).collect();
        let colors = (0..w * w).map(|p| if within(p, lo, hi) { OBJ } else if part.contains(&p) { halo_colour } else { BG }).collect();
        (part, colors, vec![BG; w * w], square)
    }

    fn mix(alpha: f32) -> [f32; 3] {
        [0, 1, 2].map(|c| BG[c] + alpha * (OBJ[c] - BG[c]))
    }

    #[test]
    fn a_mostly_background_halo_is_cut() {
        let (part, colors, bg, square) = scene(4, 16, 1, mix(0.3));
        assert_eq!(refine_edges(&part, &colors, &bg, 20, 20), square);
    }

    #[test]
    fn a_mostly_object_halo_stays() {
        let (part, colors, bg, _) = scene(4, 16, 1, mix(0.7));
        assert_eq!(refine_edges(&part, &colors, &bg, 20, 20), part);
    }

    #[test]
    fn another_tone_off_the_mixing_line_stays() {
        // Perpendicular to background -> object: no mixture of the two, a second tone.
        let (part, colors, bg, _) = scene(4, 16, 1, [220.0, 20.0, 120.0]);
        assert_eq!(refine_edges(&part, &colors, &bg, 20, 20), part);
    }

    #[test]
    fn unchanged_when_too_small_or_when_most_would_go() {
        // A 3x3 object with a 1-px halo: its 5x5 part has one pixel 2.5 px deep (under 8).
        let (part, colors, bg, _) = scene(8, 11, 1, mix(0.1));
        assert_eq!(refine_edges(&part, &colors, &bg, 20, 20), part);
        // A 4x4 object with a 2-px halo: 48 of 64 pixels would go.
        let (part, colors, bg, _) = scene(8, 12, 2, mix(0.1));
        assert_eq!(refine_edges(&part, &colors, &bg, 20, 20), part);
    }
}
