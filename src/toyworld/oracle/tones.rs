//! The tones of a region: its pixels' Lab colours clustered into a few centres (a patterned
//! object has two, a region where two objects touch has the tones of both). The colour split of
//! the segmenter labels every core pixel with its nearest centre.

use super::lab::dist3;

/// Clusters Lab colours: k-means seeded by farthest points (up to 6 centres at least 20 apart),
/// then centres closer than 12 are merged and clusters with under 3% of the points dissolved.
/// Returns the centres.
pub(super) fn tone_centres(points: &[[f32; 3]]) -> Vec<[f32; 3]> {
    let d = dist3;
    let n = points.len();
    let mean = [0, 1, 2].map(|c| points.iter().map(|p| p[c]).sum::<f32>() / n as f32);
    let mut centres: Vec<[f32; 3]> = Vec::new();
    let mut near: Vec<f32> = points.iter().map(|&p| d(p, mean) * 0.5).collect();
    while centres.len() < 6 {
        let (k, &far) = near.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
        if far < 20.0 && !centres.is_empty() {
            break;
        }
        let c = points[k];
        centres.push(c);
        for (m, &p) in near.iter_mut().zip(points) {
            *m = m.min(d(p, c));
        }
        if centres.len() == 1 {
            near = points.iter().map(|&p| d(p, c)).collect();
        }
    }
    let min_count = ((0.03 * n as f32) as usize).max(4);
    for round in 0..16 {
        let labels: Vec<usize> = points
            .iter()
            .map(|&p| (0..centres.len()).min_by(|&a, &b| d(p, centres[a]).total_cmp(&d(p, centres[b]))).unwrap())
            .collect();
        let mut sums = vec![[0f32; 3]; centres.len()];
        let mut counts = vec![0usize; centres.len()];
        for (&l, p) in labels.iter().zip(points) {
            counts[l] += 1;
            for c in 0..3 {
                sums[l][c] += p[c];
            }
        }
        let mut next: Vec<[f32; 3]> = Vec::new();
        let mut next_counts: Vec<usize> = Vec::new();
        for k in 0..centres.len() {
            if counts[k] == 0 || (round >= 4 && counts[k] < min_count) {
                continue;
            }
            let c = sums[k].map(|s| s / counts[k] as f32);
            match next.iter().position(|&o| round >= 4 && d(o, c) < 12.0) {
                Some(j) => {
                    let (a, b) = (next_counts[j] as f32, counts[k] as f32);
                    next[j] = [0, 1, 2].map(|i| (next[j][i] * a + c[i] * b) / (a + b));
                    next_counts[j] += counts[k];
                }
                None => {
                    next.push(c);
                    next_counts.push(counts[k]);
                }
            }
        }
        if next.is_empty() {
            break;
        }
        centres = next;
    }
    centres
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` points within +-0.8 of `c` on a small grid (no randomness).
    fn cluster(c: [f32; 3], n: usize) -> Vec<[f32; 3]> {
        (0..n).map(|i| [c[0] + (i % 5) as f32 * 0.4 - 0.8, c[1] + (i / 5 % 5) as f32 * 0.4 - 0.8, c[2] + (i / 25) as f32 * 0.1]).collect()
    }

    fn mean(points: &[[f32; 3]]) -> [f32; 3] {
        [0, 1, 2].map(|c| points.iter().map(|p| p[c]).sum::<f32>() / points.len() as f32)
    }

    /// Each wanted centre has exactly one found centre within `tol`.
    fn assert_centres(found: &[[f32; 3]], want: &[[f32; 3]], tol: f32) {
        assert_eq!(found.len(), want.len(), "{found:?}");
        for w in want {
            assert_eq!(found.iter().filter(|f| dist3(**f, *w) < tol).count(), 1, "{w:?} in {found:?}");
        }
    }

    #[test]
    fn one_cluster_gives_one_centre_at_its_mean() {
        let p = cluster([60.0, 10.0, -20.0], 60);
        assert_centres(&tone_centres(&p), &[mean(&p)], 1e-3);
    }

    #[test]
    fn separated_clusters_give_their_means() {
        let (a, b, c) = (cluster([30.0, 0.0, 0.0], 80), cluster([70.0, 40.0, 0.0], 50), cluster([50.0, -30.0, 60.0], 40));
        let two: Vec<[f32; 3]> = a.iter().chain(&b).copied().collect();
        assert_centres(&tone_centres(&two), &[mean(&a), mean(&b)], 1e-3);
        let three: Vec<[f32; 3]> = two.iter().chain(&c).copied().collect();
        assert_centres(&tone_centres(&three), &[mean(&a), mean(&b), mean(&c)], 1e-3);
    }

    #[test]
    fn clusters_closer_than_the_seed_spacing_are_one_tone() {
        let p: Vec<[f32; 3]> = cluster([50.0, 0.0, 0.0], 50).into_iter().chain(cluster([50.0, 8.0, 0.0], 50)).collect();
        assert_centres(&tone_centres(&p), &[mean(&p)], 1e-3);
    }

    #[test]
    fn a_cluster_under_three_percent_is_dissolved() {
        // 3 far points of 203 (3% is 6): their centre is dropped from round 4 on and the points join
        // the main tone.
        let main = cluster([40.0, 20.0, 20.0], 200);
        let p: Vec<[f32; 3]> = main.iter().copied().chain(std::iter::repeat_n([90.0, -40.0, 20.0], 3)).collect();
        assert_centres(&tone_centres(&p), &[mean(&p)], 1e-3);
    }
}
