//! Noise schedules: the DDPM forward process used for training ([`ddpm`]) and the DDIM sampler
//! used for generation ([`ddim`]), both built from a diffusers `scheduler_config.json`
//! ([`config`]) and matching diffusers numerically.

pub mod config;
pub mod ddim;
pub mod ddpm;

pub use config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
pub use ddim::DdimScheduler;
pub use ddpm::{Ddpm, NoiseSchedule};
