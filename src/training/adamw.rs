//! AdamW exactly as PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias correction),
//! with its state exposed so checkpoints can save it and `--resume` continue bit for bit.
//!
//! The state (m and v) can be kept in bf16 (`--adam-state-dtype bf16`), half the optimiser's
//! memory: each update is computed in f32 from the stored state and only the new state is
//! rounded to bf16, so the step itself is PyTorch's and the rounding enters from the next step on
//! (the memory saving kohya's and diffusers' 8-bit Adam aim at, in a form candle has).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The dtype m and v are stored in: F32 (PyTorch's) or BF16.
    pub state_dtype: DType,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults, with the method's learning rate 8e-5 (docs/method.md §2).
    fn default() -> Self {
        Self { lr: 8e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, state_dtype: DType::F32 }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<(String, Var)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Steps taken so far.
    pub step: usize,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        if !matches!(config.state_dtype, DType::F32 | DType::BF16) {
            bail!("AdamW state is kept in f32 or bf16, not {:?}", config.state_dtype);
        }
        let exp_avg = params
            .iter()
            .map(|(_, v)| Tensor::zeros(v.shape(), config.state_dtype, v.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let exp_avg_sq = exp_avg.clone();
        Ok(Self { config, params, exp_avg, exp_avg_sq, step: 0 })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with `grads[i]` for parameter `i` (`None`: no gradient, the parameter is
    /// still decayed, as PyTorch does for a parameter whose `.grad` is zero, not `None`).
    pub fn step(&mut self, grads: &[Tensor]) -> Result<()> {
        if grads.len() != self.params.len() {
            bail!("{} gradients for {} parameters", grads.len(), self.params.len());
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for (i, ((_, var), g)) in self.params.iter().zip(grads).enumerate() {
            // a gradient still attached to its forward graph would keep it alive through m and v
            let g = &g.detach();
            let p = (var.as_tensor() * (1.0 - c.lr * c.weight_decay))?;
            let m_prev = self.exp_avg[i].to_dtype(var.dtype())?;
            let v_prev = self.exp_avg_sq[i].to_dtype(var.dtype())?;
            let m = ((m_prev * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((v_prev * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + c.eps)?;
            let p = (p - (m.div(&denom)? * (c.lr / bc1))?)?;
            var.set(&p)?;
            self.exp_avg[i] = m.to_dtype(c.state_dtype)?;
            self.exp_avg_sq[i] = v.to_dtype(c.state_dtype)?;
        }
        Ok(())
    }

    /// Optimiser state for a checkpoint: `adam.m.<name>`, `adam.v.<name>`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("adam.m.{name}"), self.exp_avg[i].clone());
            out.insert(format!("adam.v.{name}"), self.exp_avg_sq[i].clone());
        }
        out
    }

    /// Restores the state saved by [`state_tensors`](Self::state_tensors).
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (prefix, slot) in [("adam.m.", &mut self.exp_avg[i]), ("adam.v.", &mut self.exp_avg_sq[i])] {
                let key = format!("{prefix}{name}");
                let Some(t) = tensors.get(&key) else { bail!("checkpoint has no optimiser state {key}") };
                if t.dims() != var.dims() {
                    bail!("checkpoint state {key} has shape {:?}, the parameter {:?}", t.dims(), var.dims());
                }
                if t.dtype() != self.config.state_dtype {
                    bail!("checkpoint state {key} is {:?}, but this run keeps AdamW state in {:?} (--adam-state-dtype)", t.dtype(), self.config.state_dtype);
                }
                *slot = t.to_device(var.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// bf16 state: the first update equals the f32 one (the rounding only enters the stored
    /// state), later ones stay within bf16's rounding of m and v, and the state is bf16.
    #[test]
    fn bf16_state_tracks_f32_state() {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1.0, (64, 32), &dev).unwrap();
        let run = |dtype: DType| {
            let var = Var::from_tensor(&init).unwrap();
            let cfg = AdamWConfig { lr: 1e-2, state_dtype: dtype, ..Default::default() };
            let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg).unwrap();
            let mut after = Vec::new();
            for k in 0..5 {
                let g = ((var.as_tensor() * 0.5).unwrap() + (k as f64) * 0.1).unwrap();
                opt.step(&[g]).unwrap();
                after.push(var.as_tensor().copy().unwrap()); // a clone would share the storage var.set overwrites
            }
            (after, opt.state_tensors())
        };
        let (f32_steps, _) = run(DType::F32);
        let (bf16_steps, state) = run(DType::BF16);
        assert!(state.values().all(|t| t.dtype() == DType::BF16));
        let rel = |a: &Tensor, b: &Tensor| -> f32 {
            let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
            d / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt()
        };
        assert_eq!(rel(&bf16_steps[0], &f32_steps[0]), 0.0, "the first step is computed in f32");
        let last = rel(&bf16_steps[4], &f32_steps[4]);
        let moved = rel(&f32_steps[4], &init);
        assert!(last > 0.0 && last < 1e-2 * moved, "bf16 state drifted: {last} (the weights moved {moved})");
        assert!(AdamW::new(vec![], AdamWConfig { state_dtype: DType::F16, ..Default::default() }).is_err());
    }
}
