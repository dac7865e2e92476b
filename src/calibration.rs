//! DisenDiff's attention calibration: cross-attention maps -> L_bind and L_s&s.
//!
//! Read this file against the paper (Sec. 3.2-3.3, Eq. 3-6) and `docs/method.md` §5:
//!
//! ```text
//!   A      = mean over heads and selected layers of softmax(QK^T/sqrt(d))[:, token]   (§5.1)
//!   Â      = (A - min A) / (max A - min A + 1e-8)                                    (§5.1)
//!   G(Â)   = reflect-pad 1, 3x3 Gaussian (outer product of [.2119, .5761, .2119])    (§5.2)
//!   f_m(x) = x^2   (suppression, class maps only; "twice suppression" = x^4)         (§5.3)
//!   IoU(a, b) = (Σ a·b + 1) / (Σ a + Σ b − Σ a·b + 1)                                 (§5.4)
//!
//!   M_i = G(Â_modifier_i)          C_i = f_m(G(Â_class_i))
//!   L_bind = Σ_i (1 − IoU(stopgrad(C_i), M_i))                                        (Eq. 3, 6)
//!   L_s&s  = IoU(C_1, C_2)   (mean over all class pairs for 3+ concepts)              (Eq. 5)
//!   L_attn = L_bind + L_s&s, per target sample, averaged over target samples
//! ```
//!
//! The ablations of the paper's Fig. 6b are switches of [`CalibrationConfig`]. Everything here
//! is differentiable candle ops (no fused op without a backward), so the losses reach the
//! attention probabilities captured by the UNet's probe and, through them, W_K and the new
//! token embeddings.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// 1-D factor of the Gaussian kernel the official code computes (effective sigma ~0.707).
pub const GAUSSIAN_1D: [f64; 3] = [0.21194156, 0.57611688, 0.21194156];

/// How the class-class term is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeparationKind {
    /// L_s&s: soft IoU of the class maps (the method).
    Iou,
    /// L_separate (Eq. 4, ablation): the plain intersection Σ C_i·C_j.
    Intersection,
}

/// The calibration and its ablations.
#[derive(Clone, Debug)]
pub struct CalibrationConfig {
    /// Use L_bind (ablation "no L_bind" sets false).
    pub bind: bool,
    /// Use the class-class term (ablation "no L_s&s" sets false).
    pub separate: bool,
    pub separation: SeparationKind,
    /// Exponent of the suppression f_m on class maps: 2 (method), 1 = none, 4 = twice.
    pub suppression_power: i32,
    /// Apply the Gaussian filter G (ablation "no Gaussian filter" sets false).
    pub gaussian: bool,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        Self { bind: true, separate: true, separation: SeparationKind::Iou, suppression_power: 2, gaussian: true }
    }
}

/// Token positions (in the 77-token prompt) of one concept: modifier `<newi>` and class word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConceptPositions {
    pub modifier: usize,
    pub class: usize,
}

/// The two terms for one batch, each a scalar tensor (already averaged over target samples).
pub struct AttentionLosses {
    pub l_bind: Tensor,
    pub l_ss: Tensor,
}

impl AttentionLosses {
    pub fn total(&self) -> candle_core::Result<Tensor> {
        &self.l_bind + &self.l_ss
    }
}

/// Min-max normalisation of each map [N, H, W] to [0, 1] (gradients flow through min and max).
pub fn min_max_normalize(maps: &Tensor) -> candle_core::Result<Tensor> {
    let (n, h, w) = maps.dims3()?;
    let flat = maps.reshape((n, h * w))?;
    let min = flat.min_keepdim(D::Minus1)?;
    let max = flat.max_keepdim(D::Minus1)?;
    let range = ((max - &min)? + 1e-8)?;
    flat.broadcast_sub(&min)?.broadcast_div(&range)?.reshape((n, h, w))
}

/// Reflect padding by one pixel on both spatial dims of [N, H, W] (torch's "reflect").
fn reflect_pad1(x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, h, w) = x.dims3()?;
    let rows = Tensor::cat(&[&x.narrow(1, 1, 1)?, x, &x.narrow(1, h - 2, 1)?], 1)?;
    Tensor::cat(&[&rows.narrow(2, 1, 1)?, &rows, &rows.narrow(2, w - 2, 1)?], 2)
}

/// G: reflect-pad by 1, then the fixed 3x3 Gaussian kernel, on maps [N, H, W].
pub fn gaussian_smooth(maps: &Tensor) -> candle_core::Result<Tensor> {
    let (_, h, w) = maps.dims3()?;
    if h < 2 || w < 2 {
        candle_core::bail!("attention maps of {h}x{w} are too small to smooth");
    }
    let padded = reflect_pad1(maps)?;
    let mut out: Option<Tensor> = None;
    for (dy, ky) in GAUSSIAN_1D.iter().enumerate() {
        for (dx, kx) in GAUSSIAN_1D.iter().enumerate() {
            let term = (padded.narrow(1, dy, h)?.narrow(2, dx, w)? * (ky * kx))?;
            out = Some(match out {
                None => term,
                Some(acc) => (acc + term)?,
            });
        }
    }
    Ok(out.expect("3x3 kernel"))
}

/// f_m: the suppression `x^power` (power 1 = identity).
pub fn suppress(maps: &Tensor, power: i32) -> candle_core::Result<Tensor> {
    match power {
        1 => Ok(maps.clone()),
        2 => maps.sqr(),
        4 => maps.sqr()?.sqr(),
        p => maps.powf(p as f64),
    }
}

/// Soft IoU of two maps [H, W] (or any equal shapes): `(Σab + 1) / (Σa + Σb − Σab + 1)`.
pub fn soft_iou(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let inter = (a * b)?.sum_all()?;
    let union = ((a.sum_all()? + b.sum_all()?)? - &inter)?;
    (inter + 1.0)? / (union + 1.0)?
}

impl CalibrationConfig {
    /// Modifier map M_i = G(Â_m).
    fn modifier_map(&self, normalized: &Tensor) -> candle_core::Result<Tensor> {
        if self.gaussian {
            gaussian_smooth(normalized)
        } else {
            Ok(normalized.clone())
        }
    }

    /// Class map C_i = f_m(G(Â_c)).
    fn class_map(&self, normalized: &Tensor) -> candle_core::Result<Tensor> {
        suppress(&self.modifier_map(normalized)?, self.suppression_power)
    }

    /// The processed maps of one sample: for each concept, M_i = G(Â_modifier) and
    /// C_i = f_m(G(Â_class)), from that sample's averaged maps `maps` [T, H, W].
    pub fn processed_maps(&self, maps: &Tensor, concepts: &[ConceptPositions]) -> Result<Vec<(Tensor, Tensor)>> {
        let mut positions: Vec<u32> = Vec::new();
        for c in concepts {
            positions.push(c.modifier as u32);
            positions.push(c.class as u32);
        }
        let idx = Tensor::new(positions.as_slice(), maps.device())?;
        let picked = min_max_normalize(&maps.index_select(&idx, 0)?)?;
        (0..concepts.len())
            .map(|i| Ok((self.modifier_map(&picked.narrow(0, 2 * i, 1)?)?, self.class_map(&picked.narrow(0, 2 * i + 1, 1)?)?)))
            .collect()
    }

    /// L_bind and L_s&s of one sample. `maps` [T, H, W] are that sample's averaged attention
    /// maps (any token set), indexed by the positions in `concepts`.
    pub fn sample_losses(&self, maps: &Tensor, concepts: &[ConceptPositions]) -> Result<(Tensor, Tensor)> {
        if concepts.is_empty() {
            bail!("no concepts to calibrate");
        }
        let zero = Tensor::zeros((), DType::F32, maps.device())?.to_dtype(maps.dtype())?;
        let (modifiers, classes): (Vec<Tensor>, Vec<Tensor>) = self.processed_maps(maps, concepts)?.into_iter().unzip();

        // Eq. 3: each modifier map bound to its class map; the class map is a fixed target.
        let mut l_bind = zero.clone();
        if self.bind {
            for (m, c) in modifiers.iter().zip(&classes) {
                let iou = soft_iou(&c.detach(), m)?;
                l_bind = (l_bind + (1.0 - iou)?)?;
            }
        }

        // Eq. 5 (or Eq. 4 as ablation): class maps pushed apart, no stop-gradient.
        let mut l_ss = zero;
        if self.separate && classes.len() >= 2 {
            let mut pairs = 0usize;
            for i in 0..classes.len() {
                for j in i + 1..classes.len() {
                    let term = match self.separation {
                        SeparationKind::Iou => soft_iou(&classes[i], &classes[j])?,
                        SeparationKind::Intersection => (&classes[i] * &classes[j])?.sum_all()?,
                    };
                    l_ss = (l_ss + term)?;
                    pairs += 1;
                }
            }
            l_ss = (l_ss / pairs as f64)?;
        }
        Ok((l_bind, l_ss))
    }

    /// The losses of a batch: for each target sample, its averaged maps [T, H, W] and its
    /// concepts' token positions (they differ between captions: "a far away photo of ...").
    /// Samples without modifier tokens (regularisation images) are left out by the caller.
    /// Each term is averaged over the target samples.
    pub fn losses(&self, samples: &[(Tensor, Vec<ConceptPositions>)]) -> Result<AttentionLosses> {
        if samples.is_empty() {
            bail!("no target samples to calibrate");
        }
        let mut bind = Vec::new();
        let mut ss = Vec::new();
        for (maps, concepts) in samples {
            let (b, s) = self.sample_losses(maps, concepts)?;
            bind.push(b);
            ss.push(s);
        }
        let n = samples.len() as f64;
        Ok(AttentionLosses { l_bind: (Tensor::stack(&bind, 0)?.sum_all()? / n)?, l_ss: (Tensor::stack(&ss, 0)?.sum_all()? / n)? })
    }
}

/// Averages captured attention probabilities into per-token maps on a `side` x `side` grid.
///
/// Each element of `probs` is one layer's [B, heads, h*w, T] with its grid (h, w). The result
/// is, per sample, the plain mean over all heads and all given layers, as [T, side, side]
/// (docs/method.md §5.1). Layers of another grid size (the "all scales" ablation) are first brought
/// to `side`: average pooling for larger grids, nearest upsampling for smaller ones.
pub fn average_maps(probs: &[(Tensor, usize, usize)], side: usize) -> Result<Vec<Tensor>> {
    if probs.is_empty() {
        bail!("no cross-attention layer was captured for the attention losses");
    }
    let mut per_layer = Vec::new();
    for (p, h, w) in probs {
        let (b, _, q, t) = p.dims4()?;
        if q != h * w {
            bail!("captured attention has {q} queries, expected {h}x{w}");
        }
        // mean over the heads as a product with a row of 1/heads: candle's reduction over a
        // middle dimension walks the tensor element by element (4% of a training step)
        let heads = p.dim(1)?;
        let row = Tensor::full(1.0 / heads as f32, (b, 1, heads), p.device())?.to_dtype(p.dtype())?;
        let m = row.matmul(&p.contiguous()?.reshape((b, heads, q * t))?)?; // [B, 1, q*t]
        let m = m.reshape((b, q, t))?.transpose(1, 2)?.reshape((b, t, *h, *w))?; // [B, T, h, w]
        let m = if *h == side && *w == side {
            m
        } else if h % side == 0 && w % side == 0 {
            m.avg_pool2d((h / side, w / side))?
        } else if side % h == 0 && side % w == 0 {
            m.upsample_nearest2d(side, side)?
        } else {
            bail!("cannot bring a {h}x{w} attention map to {side}x{side}");
        };
        per_layer.push(m);
    }
    let mean = (Tensor::stack(&per_layer, 0)?.sum(0)? / per_layer.len() as f64)?; // [B, T, s, s]
    let b = mean.dim(0)?;
    Ok((0..b).map(|i| mean.get(i)).collect::<candle_core::Result<Vec<_>>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32], shape: (usize, usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn gaussian_kernel_is_the_official_one() {
        // The 2-D kernel of docs/method.md §5.2, entry by entry.
        let want = [[0.04491922, 0.12210311, 0.04491922], [0.12210311, 0.33191066, 0.12210311]];
        for (r, row) in want.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                assert!((GAUSSIAN_1D[r] * GAUSSIAN_1D[c] - v).abs() < 1e-8);
            }
        }
        let sum: f64 = GAUSSIAN_1D.iter().sum();
        assert!((sum - 1.0).abs() < 1e-7);
    }

    #[test]
    fn gaussian_smooth_reflect_padding_by_hand() {
        // A single 1 at the corner (0,0) of a 3x3 map. Reflect padding maps index -1 to 1, so the
        // 1 is seen only once by each output pixel: out[0,0] = k[1][1], out[0,1] = k[1][0],
        // out[1,1] = k[0][0].
        let x = t(&[1., 0., 0., 0., 0., 0., 0., 0., 0.], (1, 3, 3));
        let y = gaussian_smooth(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((y[0] - 0.33191066).abs() < 1e-6);
        assert!((y[1] - 0.12210311).abs() < 1e-6);
        assert!((y[4] - 0.04491922).abs() < 1e-6);
        // A 1 at (0,1): out[0,0] sees column 1 directly (k[1][2]) and again as the reflection of
        // column -1 (k[1][0]): 2 x 0.12210311.
        let x = t(&[0., 1., 0., 0., 0., 0., 0., 0., 0.], (1, 3, 3));
        let y = gaussian_smooth(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((y[0] - 0.24420622).abs() < 1e-6, "{}", y[0]);
        // Constant maps stay constant (the kernel sums to 1).
        let x = t(&[0.5; 16], (1, 4, 4));
        let y = gaussian_smooth(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(y.iter().all(|v| (v - 0.5).abs() < 1e-6));
    }

    #[test]
    fn min_max_by_hand() {
        let x = t(&[2., 4., 6., 10.], (1, 2, 2));
        let y = min_max_normalize(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = [0.0, 0.25, 0.5, 1.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn soft_iou_by_hand() {
        // a = [1, 0.5, 0, 0], b = [1, 0, 0.5, 0]: Σab = 1, Σa = Σb = 1.5 -> (1+1)/(1.5+1.5-1+1) = 2/3.
        let a = t(&[1., 0.5, 0., 0.], (1, 2, 2));
        let b = t(&[1., 0., 0.5, 0.], (1, 2, 2));
        let v = soft_iou(&a, &b).unwrap().to_scalar::<f32>().unwrap();
        assert!((v - 2.0 / 3.0).abs() < 1e-6);
        // Disjoint maps: 1 / (Σa + Σb + 1).
        let c = t(&[0., 0., 0., 2.], (1, 2, 2));
        let v = soft_iou(&a, &c).unwrap().to_scalar::<f32>().unwrap();
        assert!((v - 1.0 / 4.5).abs() < 1e-6);
    }

    #[test]
    fn suppression_squares_class_maps_only() {
        let x = t(&[0.5, 1.0, 0.2, 0.0], (1, 2, 2));
        let y = suppress(&x, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(y, vec![0.25, 1.0, 0.040000003, 0.0]);
        let y4 = suppress(&x, 4).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((y4[0] - 0.0625).abs() < 1e-7);
        // With the Gaussian and min-max off, a modifier map equal to the class map still has a
        // non-zero L_bind, because only the class map is squared.
        let cfg = CalibrationConfig { gaussian: false, ..Default::default() };
        let maps = t(&[0.0, 0.5, 1.0, 0.25, 0.0, 0.5, 1.0, 0.25], (2, 2, 2));
        let (bind, _) = cfg.sample_losses(&maps, &[ConceptPositions { modifier: 0, class: 1 }]).unwrap();
        // M = [0, .5, 1, .25], C = M^2 = [0, .25, 1, .0625]: Σmc = 1.140625, Σm = 1.75, Σc = 1.3125.
        let iou = (1.140625 + 1.0) / (1.75 + 1.3125 - 1.140625 + 1.0);
        assert!((bind.to_scalar::<f32>().unwrap() as f64 - (1.0 - iou)).abs() < 1e-6);
    }

    #[test]
    fn bind_gives_no_gradient_to_the_class_map_but_ss_does() {
        let maps = Var::from_tensor(&Tensor::rand(0f32, 1.0, (4, 4, 4), &Device::Cpu).unwrap()).unwrap();
        let concepts = [ConceptPositions { modifier: 0, class: 1 }, ConceptPositions { modifier: 2, class: 3 }];
        let only_bind = CalibrationConfig { separate: false, ..Default::default() };
        let l = only_bind.losses(&[(maps.as_tensor().clone(), concepts.to_vec())]).unwrap();
        let g = l.total().unwrap().backward().unwrap();
        let g = g.get(maps.as_tensor()).unwrap();
        let norm = |i: usize| g.get(i).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm(0) > 0.0 && norm(2) > 0.0, "modifier maps need a gradient");
        assert_eq!(norm(1), 0.0, "L_bind must not move the class map");
        assert_eq!(norm(3), 0.0);
        let l = CalibrationConfig::default().losses(&[(maps.as_tensor().clone(), concepts.to_vec())]).unwrap();
        let g = l.total().unwrap().backward().unwrap();
        let g = g.get(maps.as_tensor()).unwrap();
        assert!(g.get(1).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }

    #[test]
    fn average_maps_is_the_mean_over_heads_and_layers() {
        let dev = Device::Cpu;
        let a = Tensor::rand(0f32, 1.0, (2, 3, 4, 5), &dev).unwrap();
        let b = Tensor::rand(0f32, 1.0, (2, 3, 4, 5), &dev).unwrap();
        let maps = average_maps(&[(a.clone(), 2, 2), (b.clone(), 2, 2)], 2).unwrap();
        assert_eq!(maps[0].dims(), &[5, 2, 2]);
        // sample 1, token 4, pixel (1, 0) = query 2
        let want: f32 = (0..3)
            .map(|h| {
                a.get(1).unwrap().get(h).unwrap().get(2).unwrap().get(4).unwrap().to_scalar::<f32>().unwrap()
                    + b.get(1).unwrap().get(h).unwrap().get(2).unwrap().get(4).unwrap().to_scalar::<f32>().unwrap()
            })
            .sum::<f32>()
            / 6.0;
        let got = maps[1].get(4).unwrap().get(1).unwrap().get(0).unwrap().to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-6);
    }
}
