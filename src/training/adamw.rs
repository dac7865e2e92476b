//! AdamW exactly as PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias correction),
//! with its state exposed so checkpoints can save it and `--resume` continue bit for bit.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults, with the method's learning rate 8e-5 (docs/method.md §2).
    fn default() -> Self {
        Self { lr: 8e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
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
        let exp_avg = params.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
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
            let p = (var.as_tensor() * (1.0 - c.lr * c.weight_decay))?;
            let m = ((&self.exp_avg[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.exp_avg_sq[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + c.eps)?;
            let p = (p - (m.div(&denom)? * (c.lr / bc1))?)?;
            var.set(&p)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
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
                *slot = t.to_device(var.device())?.to_dtype(var.dtype())?;
            }
        }
        self.step = step;
        Ok(())
    }
}
