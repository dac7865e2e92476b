//! A small singular value decomposition (one-sided Jacobi, f64) for `--lora-format lowrank`:
//! no LAPACK is available offline, and the matrices are small (at most 1280 x 1024 for real
//! Stable Diffusion K/V).
//!
//! Hestenes' method: the columns of A (m >= n; otherwise Aᵀ is decomposed) are rotated in pairs
//! until all are orthogonal, the same rotations building V; then σⱼ = ‖aⱼ‖ and uⱼ = aⱼ / σⱼ.
//! Sorted by falling σ. A column with σ = 0 (a rank-deficient A) gets a zero u.

/// A = U diag(S) Vᵀ with U [m, k], V [n, k] (row-major), S [k], k = min(m, n).
pub struct Svd {
    pub m: usize,
    pub n: usize,
    pub u: Vec<f64>,
    pub s: Vec<f64>,
    pub v: Vec<f64>,
}

impl Svd {
    pub fn k(&self) -> usize {
        self.s.len()
    }
}

/// Decomposes the row-major `a` [m, n].
pub fn svd(a: &[f64], m: usize, n: usize) -> Svd {
    assert_eq!(a.len(), m * n, "svd: {} values for a {m} x {n} matrix", a.len());
    if m < n {
        let mut t = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                t[j * m + i] = a[i * n + j];
            }
        }
        let d = svd(&t, n, m);
        return Svd { m, n, u: d.v, s: d.s, v: d.u };
    }
    // columns of A and of V, each contiguous
    let mut cols: Vec<Vec<f64>> = (0..n).map(|j| (0..m).map(|i| a[i * n + j]).collect()).collect();
    let mut vcols: Vec<Vec<f64>> = (0..n).map(|j| (0..n).map(|i| if i == j { 1.0 } else { 0.0 }).collect()).collect();
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
    let eps = 1e-15;
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let alpha = dot(&cols[p], &cols[p]);
                let beta = dot(&cols[q], &cols[q]);
                let gamma = dot(&cols[p], &cols[q]);
                if gamma == 0.0 || gamma.abs() <= eps * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                let (lo, hi) = cols.split_at_mut(q);
                rotate(&mut lo[p], &mut hi[0], c, s);
                let (lo, hi) = vcols.split_at_mut(q);
                rotate(&mut lo[p], &mut hi[0], c, s);
            }
        }
        if !rotated {
            break;
        }
    }
    let sig: Vec<f64> = cols.iter().map(|c| dot(c, c).sqrt()).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| sig[y].total_cmp(&sig[x]));
    let (mut u, mut v, mut s) = (vec![0.0; m * n], vec![0.0; n * n], vec![0.0; n]);
    for (k, &j) in order.iter().enumerate() {
        s[k] = sig[j];
        if sig[j] > 0.0 {
            for i in 0..m {
                u[i * n + k] = cols[j][i] / sig[j];
            }
        }
        for i in 0..n {
            v[i * n + k] = vcols[j][i];
        }
    }
    Svd { m, n, u, s, v }
}

/// (x, y) <- (c x - s y, s x + c y).
fn rotate(x: &mut [f64], y: &mut [f64], c: f64, s: f64) {
    for (a, b) in x.iter_mut().zip(y.iter_mut()) {
        let (p, q) = (*a, *b);
        *a = c * p - s * q;
        *b = s * p + c * q;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(m: usize, n: usize, seed: u64) -> Vec<f64> {
        // a fixed LCG: the tests need no more than varied numbers
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..m * n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    fn check(m: usize, n: usize, seed: u64) {
        let a = random(m, n, seed);
        let d = svd(&a, m, n);
        let k = m.min(n);
        assert_eq!((d.u.len(), d.v.len(), d.s.len()), (m * k, n * k, k));
        let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut err = 0f64;
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k).map(|t| d.u[i * k + t] * d.s[t] * d.v[j * k + t]).sum();
                err = err.max((r - a[i * n + j]).abs());
            }
        }
        assert!(err <= 1e-12 * norm, "{m}x{n}: U S Vt differs from A by {err}");
        for (mat, rows) in [(&d.u, m), (&d.v, n)] {
            for p in 0..k {
                for q in 0..k {
                    let g: f64 = (0..rows).map(|i| mat[i * k + p] * mat[i * k + q]).sum();
                    let want = if p == q { 1.0 } else { 0.0 };
                    assert!((g - want).abs() <= 1e-12, "{m}x{n}: columns {p}, {q} give {g}");
                }
            }
        }
        assert!(d.s.windows(2).all(|w| w[0] >= w[1]) && d.s[k - 1] >= 0.0, "{m}x{n}: {:?}", d.s);
        // the Frobenius norm is the root of the sum of squared singular values
        let fro: f64 = d.s.iter().map(|s| s * s).sum::<f64>().sqrt();
        assert!((fro - norm).abs() <= 1e-12 * norm);
    }

    #[test]
    fn reconstructs_with_orthonormal_factors() {
        check(7, 5, 1);
        check(5, 7, 2);
        check(16, 16, 3);
        check(40, 24, 4);
        check(1, 6, 5);
    }

    #[test]
    fn known_matrix() {
        // diag(3, 2) rotated: singular values 3 and 2
        let (c, s) = (0.6f64, 0.8f64);
        let a = [3.0 * c, -2.0 * s, 3.0 * s, 2.0 * c];
        let d = svd(&a, 2, 2);
        assert!((d.s[0] - 3.0).abs() < 1e-14 && (d.s[1] - 2.0).abs() < 1e-14, "{:?}", d.s);
        // rank one: one zero singular value, U S Vt still A
        let b = [1.0, 2.0, 2.0, 4.0, 3.0, 6.0];
        let d = svd(&b, 3, 2);
        assert!((d.s[0] - 70f64.sqrt()).abs() < 1e-12 && d.s[1].abs() < 1e-12, "{:?}", d.s);
    }
}
